// Precompiled header: the LibTorch headers almost every vimo file needs. Narrow on purpose (no torch/torch.h).
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/autograd.h>
#include <torch/types.h>
#include <string>
#include <vector>
#include <memory>
