// CPU emulation stand-in for CUDA's <math_constants.h> (only what cuda/*.cu use).
#pragma once
#include <math.h>
#define CUDART_INF HUGE_VAL
