//! NEON kernels for aarch64 (the client). NEON is part of the aarch64 baseline (this module is only
//! compiled when the `neon` target feature is on, as it is for every aarch64 Linux target), so these
//! are used unconditionally there. Only Armv8.0 instructions: the Pi 4's Cortex-A72 has no `dotprod`.
//!
//! The kernels are `#[target_feature(enable = "neon")]` functions, which Rust makes `unsafe` to call
//! from outside such functions even when the feature is on for the whole build; the `pub(super)`
//! wrappers are the safe entry points.

use core::arch::aarch64::{
    int32x4_t, int8x16_t, uint32x4_t, vaddq_s32, vaddq_u32, vaddvq_s32, vaddvq_u32, vdupq_n_s32,
    vdupq_n_u32, vget_low_s16, vget_low_s8, vld1q_s8, vld1q_u32, vmlaq_u32, vmovl_high_s16,
    vmovl_high_s8, vmovl_s16, vmovl_s8, vmull_high_s8, vmull_s8, vpadalq_s16,
    vreinterpretq_u32_s32,
};

/// `Σ x[i] · w[i] (mod 2^32)`.
pub(super) fn dot_u32_i8(x: &[u32], w: &[u8]) -> u32 {
    // SAFETY: this module is only compiled with the `neon` target feature on, so the CPU has NEON.
    unsafe { dot_u32_i8_neon(x, w) }
}

/// Four rows against one weight row: each weight vector is loaded and widened once.
pub(super) fn dot4_u32_i8(x: [&[u32]; 4], w: &[u8]) -> [u32; 4] {
    // SAFETY: this module is only compiled with the `neon` target feature on, so the CPU has NEON.
    unsafe { dot4_u32_i8_neon(x, w) }
}

/// `Σ x[i] · w[i]` for int8 `x` and int8-bit-pattern `w` (wrapping in i32).
pub(super) fn dot_i8_i8(x: &[i8], w: &[u8]) -> i32 {
    // SAFETY: this module is only compiled with the `neon` target feature on, so the CPU has NEON.
    unsafe { dot_i8_i8_neon(x, w) }
}

/// Four int8 rows against one weight row.
pub(super) fn dot4_i8_i8(x: [&[i8]; 4], w: &[u8]) -> [i32; 4] {
    // SAFETY: this module is only compiled with the `neon` target feature on, so the CPU has NEON.
    unsafe { dot4_i8_i8_neon(x, w) }
}

/// Four u32 from `x[i..i + 4]`.
///
/// # Safety
/// `i + 4 <= x.len()`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_u32x4(x: &[u32], i: usize) -> uint32x4_t {
    debug_assert!(i + 4 <= x.len());
    // SAFETY: the caller guarantees 4 readable u32 at `i`; vld1q needs only element alignment.
    unsafe { vld1q_u32(x.as_ptr().add(i)) }
}

/// `i8` or `u8`: a byte that holds an int8.
trait Int8: Copy {}
impl Int8 for i8 {}
impl Int8 for u8 {}

/// Sixteen int8 from `p[i..i + 16]`.
///
/// # Safety
/// `i + 16 <= p.len()`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_i8x16<T: Int8>(p: &[T], i: usize) -> int8x16_t {
    debug_assert!(i + 16 <= p.len());
    // SAFETY: the caller guarantees 16 readable bytes at `i` (T is one byte); no alignment needed.
    unsafe { vld1q_s8(p.as_ptr().add(i).cast::<i8>()) }
}

/// Sixteen int8 weights sign-extended to four vectors of i32, seen as u32 (wrapping products).
#[inline]
#[target_feature(enable = "neon")]
fn widen16(w: int8x16_t) -> [uint32x4_t; 4] {
    let lo = vmovl_s8(vget_low_s8(w));
    let hi = vmovl_high_s8(w);
    [
        vreinterpretq_u32_s32(vmovl_s16(vget_low_s16(lo))),
        vreinterpretq_u32_s32(vmovl_high_s16(lo)),
        vreinterpretq_u32_s32(vmovl_s16(vget_low_s16(hi))),
        vreinterpretq_u32_s32(vmovl_high_s16(hi)),
    ]
}

/// # Safety
/// The CPU must have NEON.
#[target_feature(enable = "neon")]
unsafe fn dot_u32_i8_neon(x: &[u32], w: &[u8]) -> u32 {
    assert_eq!(x.len(), w.len(), "dot of unequal lengths");
    let n = x.len();
    let mut acc = [vdupq_n_u32(0); 4];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, within `w`.
        let wv = widen16(unsafe { load_i8x16(w, i) });
        for (k, (acc, wv)) in acc.iter_mut().zip(wv).enumerate() {
            // SAFETY: i + 4k + 4 <= i + 16 <= n, within `x`.
            let xv = unsafe { load_u32x4(x, i + 4 * k) };
            *acc = vmlaq_u32(*acc, xv, wv);
        }
        i += 16;
    }
    let acc = vaddq_u32(vaddq_u32(acc[0], acc[1]), vaddq_u32(acc[2], acc[3]));
    let mut total = vaddvq_u32(acc);
    for (&x, &w) in x[i..].iter().zip(&w[i..]) {
        total = total.wrapping_add(x.wrapping_mul(w as i8 as i32 as u32));
    }
    total
}

/// # Safety
/// The CPU must have NEON.
#[target_feature(enable = "neon")]
unsafe fn dot4_u32_i8_neon(x: [&[u32]; 4], w: &[u8]) -> [u32; 4] {
    assert!(
        x.iter().all(|x| x.len() == w.len()),
        "dot of unequal lengths"
    );
    let n = w.len();
    let mut acc = [vdupq_n_u32(0); 4];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, within `w`.
        let wv = widen16(unsafe { load_i8x16(w, i) });
        for (acc, x) in acc.iter_mut().zip(x) {
            for (k, &wv) in wv.iter().enumerate() {
                // SAFETY: i + 4k + 4 <= i + 16 <= n, within `x`.
                let xv = unsafe { load_u32x4(x, i + 4 * k) };
                *acc = vmlaq_u32(*acc, xv, wv);
            }
        }
        i += 16;
    }
    let mut out = [0u32; 4];
    for ((out, acc), x) in out.iter_mut().zip(acc).zip(x) {
        let mut total = vaddvq_u32(acc);
        for (&x, &w) in x[i..].iter().zip(&w[i..]) {
            total = total.wrapping_add(x.wrapping_mul(w as i8 as i32 as u32));
        }
        *out = total;
    }
    out
}

/// Adds the 16 products `x · w` of int8 vectors into `acc`: `vmull_s8` gives exact i16 products
/// (|p| ≤ 2^14), `vpadalq_s16` adds adjacent pairs into the i32 lanes.
#[inline]
#[target_feature(enable = "neon")]
fn mac16_i8(acc: int32x4_t, x: int8x16_t, w: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(x), vget_low_s8(w));
    let hi = vmull_high_s8(x, w);
    vpadalq_s16(vpadalq_s16(acc, lo), hi)
}

/// # Safety
/// The CPU must have NEON.
#[target_feature(enable = "neon")]
unsafe fn dot_i8_i8_neon(x: &[i8], w: &[u8]) -> i32 {
    assert_eq!(x.len(), w.len(), "dot of unequal lengths");
    let n = x.len();
    let mut acc = [vdupq_n_s32(0); 2];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let at = i + 16 * k;
            // SAFETY: at + 16 <= i + 32 <= n, within both slices.
            let (xv, wv) = unsafe { (load_i8x16(x, at), load_i8x16(w, at)) };
            *acc = mac16_i8(*acc, xv, wv);
        }
        i += 32;
    }
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, within both slices.
        let (xv, wv) = unsafe { (load_i8x16(x, i), load_i8x16(w, i)) };
        acc[0] = mac16_i8(acc[0], xv, wv);
        i += 16;
    }
    let mut total = vaddvq_s32(vaddq_s32(acc[0], acc[1]));
    for (&x, &w) in x[i..].iter().zip(&w[i..]) {
        total = total.wrapping_add(x as i32 * w as i8 as i32);
    }
    total
}

/// # Safety
/// The CPU must have NEON.
#[target_feature(enable = "neon")]
unsafe fn dot4_i8_i8_neon(x: [&[i8]; 4], w: &[u8]) -> [i32; 4] {
    assert!(
        x.iter().all(|x| x.len() == w.len()),
        "dot of unequal lengths"
    );
    let n = w.len();
    let mut acc = [vdupq_n_s32(0); 4];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, within `w`.
        let wv = unsafe { load_i8x16(w, i) };
        for (acc, x) in acc.iter_mut().zip(x) {
            // SAFETY: i + 16 <= n, within `x`.
            let xv = unsafe { load_i8x16(x, i) };
            *acc = mac16_i8(*acc, xv, wv);
        }
        i += 16;
    }
    let mut out = [0i32; 4];
    for ((out, acc), x) in out.iter_mut().zip(acc).zip(x) {
        let mut total = vaddvq_s32(acc);
        for (&x, &w) in x[i..].iter().zip(&w[i..]) {
            total = total.wrapping_add(x as i32 * w as i8 as i32);
        }
        *out = total;
    }
    out
}
