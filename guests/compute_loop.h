/*
 * compute_loop.h - the register-only xorshift/multiply loop shared by the
 * compute guest and the native_compute host baseline (same source, same
 * flags: -O2 -mgeneral-regs-only), so both run the same instructions.
 */
#ifndef COMPUTE_LOOP_H
#define COMPUTE_LOOP_H

#ifdef GUEST
#include "lib.h"
#else
#include <stdint.h>
typedef uint64_t u64;
#define HOT __attribute__((noinline, aligned(64)))
#endif

#define COMPUTE_DEFAULT_ITERS 200000000ull

u64 compute_loop(u64 iters);

#endif
