//! A `no_std`, `no_main`, allocator-free binary that links `veil-core`; it is built, never run.
//!
//! If `veil-core` or any of its dependencies starts using `std`, rustc stops with a duplicate
//! `panic_impl` lang item (std brings its own panic handler); if one starts using `alloc`, rustc
//! stops with "no global memory allocator found". The binary is linked with
//! `-nostartfiles -nostdlib -static` (see build.rs), so no C runtime or C library is there to lean
//! on either: the only platform symbols are the stubs below, which `core` itself requires.
#![no_std]
#![no_main]
// Keep LLVM from turning the loops of the `mem*` stubs into calls to themselves.
#![no_builtins]

use core::hint::black_box;
use core::panic::PanicInfo;

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    halt()
}

fn halt() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The entry point. It calls into veil-core so that real code is linked, not only metadata.
#[no_mangle]
pub extern "C" fn _start() -> ! {
    let row = black_box([3 << 16, -(1 << 16), 7, 0]);
    let mut q = [0i8; 4];
    let scale = veil_core::quant::quantize_row(&row, &mut q);
    black_box((scale, q));
    rlwe();
    rope();
    halt()
}

/// RoPE's frequencies and one position's cosines and sines, so the `libm` the core now depends on
/// (pow, cos, sin, round) is linked and shown to need no C library.
fn rope() {
    use veil_core::rope::{Llama3Scaling, RopeConfig, RopeScaling};
    let cfg = black_box(RopeConfig {
        theta: 500000.0,
        scaling: RopeScaling::Llama3(Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_positions: 64,
        }),
    });
    let mut f = [0f64; 16];
    cfg.inv_freq(32, &mut f);
    let mut trig = [0i32; 32];
    veil_core::rope::trig_row(black_box(17), &f, &mut trig);
    let mut x = black_box([1i32 << 16; 32]);
    veil_core::rope::rotate_head(&mut x, &trig);
    black_box((trig, x));
}

/// The RLWE offline phase end to end, so its code (NTT tables, ChaCha expansion, the server's
/// product, the noise bound's `f64` arithmetic) is linked too.
fn rlwe() {
    use rand_chacha::rand_core::SeedableRng;
    use veil_core::rlwe::{self, ModSwitch, SecretKey, Seed, Workspace, N};
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(black_box([1; 32]));
    let mut key_words = [0u32; SecretKey::WORDS];
    let key = SecretKey::generate(&mut rng, &mut key_words);
    let mut ws_words = [0u32; Workspace::WORDS];
    let mut ws = Workspace::new(&mut ws_words);
    let seed = Seed::random(&mut rng);
    let msg = black_box([0u32; N]);
    let mut ct = [0u64; 2 * N];
    let (a, b) = ct.split_at_mut(N);
    rlwe::encrypt(&key, &seed, 0, &msg, &mut rng, &mut ws, b);
    rlwe::expand_a(&seed, 0, 0, a);
    let mut out = [0u64; 2 * N];
    rlwe::gemm_i8_u64(&ct, &[1], 1, 1, 2 * N, &mut out);
    let sw = ModSwitch::RECOMMENDED;
    let (a, b) = out.split_at_mut(N);
    rlwe::mod_switch(a, sw.drop_a);
    rlwe::mod_switch(b, sw.drop_b);
    let mut u = [0u32; N];
    rlwe::decrypt(&key, a, b, sw, &mut ws, &mut u);
    black_box((u, rlwe::log2_failure_bound(black_box(1 << 20), sw)));
}

/// Referenced by the unwind tables of the prebuilt `core` (compiled with `panic=unwind`); never
/// called, since everything here is built with `panic=abort`.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

// The symbols `core` expects the platform to provide (see the `core` crate documentation). On
// `*-linux-gnu` they normally come from libc, which is deliberately absent here.

/// # Safety
/// `dest` and `src` must be valid for `n` bytes and must not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller upholds memcpy's contract, which implies memmove's.
    unsafe { memmove(dest, src, n) }
}

/// # Safety
/// `dest` and `src` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) < (src as usize) {
        for i in 0..n {
            // SAFETY: i < n, within both buffers; copying forwards is safe when dest < src.
            unsafe { *dest.add(i) = *src.add(i) };
        }
    } else {
        for i in (0..n).rev() {
            // SAFETY: i < n, within both buffers; copying backwards is safe when dest >= src.
            unsafe { *dest.add(i) = *src.add(i) };
        }
    }
    dest
}

/// # Safety
/// `dest` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: i < n, within the buffer.
        unsafe { *dest.add(i) = c as u8 };
    }
    dest
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n, within both buffers.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// # Safety
/// `s` must point to a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the string is NUL-terminated, so every byte up to the NUL is readable.
    while unsafe { *s.add(n) } != 0 {
        n += 1;
    }
    n
}
