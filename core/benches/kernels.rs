//! Kernel throughput for distilgpt2's shapes: the scalar kernels against the ones the CPU
//! dispatches to (`veil_core::kernels::isa()`). Throughput is in multiply-accumulates
//! (`elem/s` = MAC/s).
//!
//! `cargo bench -p veil-core --bench kernels -- --warm-up-time 1 --measurement-time 2`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use veil_core::kernels::{self, scalar};

/// (name, in, out) of distilgpt2's linear layers and its LM head.
const SHAPES: [(&str, usize, usize); 5] = [
    ("qkv", 768, 2304),
    ("attn_out", 768, 768),
    ("fc", 768, 3072),
    ("proj", 3072, 768),
    ("lm_head", 768, 50257),
];

/// Rows per product: one decoded token, a server batch of 8 clients' rows, and a 32-token prefill
/// (not for the LM head, which only ever sees the last row).
const ROWS: [usize; 3] = [1, 8, 32];

fn pseudo_random(len: usize, seed: u32) -> impl Iterator<Item = u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9) | 1;
    (0..len).map(move |_| {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    })
}

fn bench_dot(c: &mut Criterion) {
    let simd = kernels::isa().name();
    let mut g = c.benchmark_group("dot");
    for len in [768, 3072] {
        let x: Vec<u32> = pseudo_random(len, 1).collect();
        let xq: Vec<i8> = pseudo_random(len, 2).map(|v| v as i8).collect();
        let w: Vec<u8> = pseudo_random(len, 3).map(|v| v as u8).collect();
        g.throughput(Throughput::Elements(len as u64));
        g.bench_function(BenchmarkId::new("u32_i8/scalar", len), |b| {
            b.iter(|| scalar::dot_u32_i8(black_box(&x), black_box(&w)))
        });
        g.bench_function(BenchmarkId::new(format!("u32_i8/{simd}"), len), |b| {
            b.iter(|| kernels::dot_u32_i8(black_box(&x), black_box(&w)))
        });
        g.bench_function(BenchmarkId::new("i8_i8/scalar", len), |b| {
            b.iter(|| scalar::dot_i8_i8(black_box(&xq), black_box(&w)))
        });
        g.bench_function(BenchmarkId::new(format!("i8_i8/{simd}"), len), |b| {
            b.iter(|| kernels::dot_i8_i8(black_box(&xq), black_box(&w)))
        });
    }
    g.finish();
}

fn bench_matmul(c: &mut Criterion) {
    let simd = kernels::isa().name();
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10);
    for (name, in_dim, out_dim) in SHAPES {
        let w: Vec<u8> = pseudo_random(in_dim * out_dim, 3)
            .map(|v| v as u8)
            .collect();
        for rows in ROWS {
            if name == "lm_head" && rows > 1 {
                continue;
            }
            let x: Vec<u32> = pseudo_random(rows * in_dim, 1).collect();
            let xq: Vec<i8> = pseudo_random(rows * in_dim, 2).map(|v| v as i8).collect();
            let mut y = vec![0u32; rows * out_dim];
            let mut yq = vec![0i32; rows * out_dim];
            let shape = format!("{name}/{rows}x{in_dim}x{out_dim}");
            g.throughput(Throughput::Elements((rows * in_dim * out_dim) as u64));
            g.bench_function(BenchmarkId::new("u32_i8/scalar", &shape), |b| {
                b.iter(|| scalar::matmul_u32_i8(black_box(&x), &w, in_dim, out_dim, &mut y))
            });
            g.bench_function(BenchmarkId::new(format!("u32_i8/{simd}"), &shape), |b| {
                b.iter(|| kernels::matmul_u32_i8(black_box(&x), &w, in_dim, out_dim, &mut y))
            });
            g.bench_function(BenchmarkId::new("i8_i8/scalar", &shape), |b| {
                b.iter(|| scalar::matmul_i8_i8(black_box(&xq), &w, in_dim, out_dim, &mut yq))
            });
            g.bench_function(BenchmarkId::new(format!("i8_i8/{simd}"), &shape), |b| {
                b.iter(|| kernels::matmul_i8_i8(black_box(&xq), &w, in_dim, out_dim, &mut yq))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_dot, bench_matmul);
criterion_main!(benches);
