// Stand-in for the CUDA toolkit header of the same name when csrc/cuda is compiled for the emulator.
#pragma once

#include "hf_int8_emu/cuda_dialect.h"
