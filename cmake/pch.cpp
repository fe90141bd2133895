// Translation unit that carries the shared precompiled header (cmake/pch.h).
