//! The RLWE offline phase per term: client encryption (one ciphertext holds N slots of one input
//! index, so ns per encrypted input term = time / N), client decryption (ns per decrypted output
//! term = time / N), the server's seed expansion, and its int8 × u64 product (elem/s = MAC/s over
//! ciphertext words) on the scalar kernel and on the SIMD one this CPU gets.
//!
//! `cargo bench -p veil-core --bench rlwe -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::hint::black_box;
use veil_core::kernels;
use veil_core::rlwe::{self, ntt, ModSwitch, SecretKey, Seed, Workspace, N};

fn bench_client(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut key_words = vec![0u32; SecretKey::WORDS];
    let key = SecretKey::generate(&mut rng, &mut key_words);
    let mut ws_words = vec![0u32; Workspace::WORDS];
    let mut ws = Workspace::new(&mut ws_words);
    let seed = Seed::random(&mut rng);
    let msg: Vec<u32> = (0..N).map(|_| rng.next_u32()).collect();
    let mut a = vec![0u64; N];
    let mut b = vec![0u64; N];
    let mut out = vec![0u32; N];

    let mut g = c.benchmark_group("rlwe_client");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("ntt_forward", |bch| {
        let mut v = Box::new([0u32; N]);
        v.iter_mut().enumerate().for_each(|(i, x)| *x = i as u32);
        bch.iter(|| ntt::forward(black_box(&mut v)))
    });
    g.bench_function("ntt_inverse", |bch| {
        let mut v = Box::new([0u32; N]);
        v.iter_mut().enumerate().for_each(|(i, x)| *x = i as u32);
        bch.iter(|| ntt::inverse(black_box(&mut v)))
    });
    g.bench_function("keygen", |bch| {
        let mut words = vec![0u32; SecretKey::WORDS];
        bch.iter(|| drop(SecretKey::generate(&mut rng, &mut words)))
    });
    let mut index = 0;
    // The errors from the stream the client draws them from.
    let mut errors = rlwe::ErrorRng::from_key(&[9; 32]);
    g.bench_function("encrypt_per_input_term", |bch| {
        bch.iter(|| {
            index += 1;
            rlwe::encrypt(
                &key,
                &seed,
                index,
                black_box(&msg),
                &mut errors,
                &mut ws,
                &mut b,
            )
        })
    });
    rlwe::expand_a(&seed, index, 0, &mut a);
    for (name, sw) in [
        (
            "decrypt_per_output_term/switched_23_28",
            ModSwitch::RECOMMENDED,
        ),
        ("decrypt_per_output_term/unswitched", ModSwitch::NONE),
    ] {
        let (mut a2, mut b2) = (a.clone(), b.clone());
        rlwe::mod_switch(&mut a2, sw.drop_a);
        rlwe::mod_switch(&mut b2, sw.drop_b);
        g.bench_function(name, |bch| {
            bch.iter(|| rlwe::decrypt(&key, black_box(&a2), &b2, sw, &mut ws, &mut out))
        });
    }
    g.finish();

    // The offline check per term: 256 columns of N slots into the T accumulators.
    let mut g = c.benchmark_group("rlwe_check");
    let cols = 256;
    g.throughput(Throughput::Elements((cols * N) as u64));
    let columns: Vec<u32> = (0..cols * N).map(|_| rng.next_u32()).collect();
    let coeffs: Vec<u32> = (0..cols * rlwe::check::OFFLINE_CHECKS)
        .map(|_| rng.next_u32())
        .collect();
    let mut acc = vec![0u32; rlwe::check::OFFLINE_CHECKS * N];
    g.bench_function("accumulate_per_term", |bch| {
        bch.iter(|| rlwe::check::accumulate(&mut acc, black_box(&columns), &coeffs))
    });
    g.finish();
}

/// The mask columns of one input block (64 columns) of 4096 slots, each slot with its own key:
/// `mask_columns` (eight slots per ChaCha20 call on AVX2) against one slot at a time
/// (`fill_mask_from`, rand_chacha), checked equal first. Per term = per mask word.
fn bench_masks(c: &mut Criterion) {
    use veil_core::mask::{fill_mask_from, MaskAddress, MaskDomain, MaskKey};
    use veil_core::model::ModelConfig;
    use veil_core::rlwe::layer::{mask_columns, COLUMNS};
    let cfg = ModelConfig {
        n_layer: 6,
        n_embd: 768,
        n_head: 12,
        n_positions: 1024,
        vocab_size: 50257,
        n_inner: 3072,
        family: veil_core::model::Family::Gpt2,
    };
    let linear = cfg.linears().nth(3).expect("a layer");
    let keys: Vec<MaskKey> = (0..N)
        .map(|k| MaskKey::from_bytes([(k % 251) as u8; 32]))
        .collect();
    let (slot0, first) = (8192u64, 128usize);
    let mut want = vec![0u32; COLUMNS * N];
    let one_at_a_time = |out: &mut [u32]| {
        let mut row = [0u32; COLUMNS];
        for (k, key) in keys.iter().enumerate() {
            let addr = MaskAddress {
                slot: slot0 + k as u64,
                linear: linear.flat_index(&cfg),
                domain: MaskDomain::Input,
            };
            fill_mask_from(key, addr, first, &mut row);
            for (c, &r) in row.iter().enumerate() {
                out[c * N + k] = r;
            }
        }
    };
    one_at_a_time(&mut want);
    let mut got = vec![0u32; COLUMNS * N];
    let columns = |out: &mut [u32]| {
        mask_columns(
            &keys,
            &cfg,
            linear,
            slot0..slot0 + N as u64,
            first..first + COLUMNS,
            out,
        )
    };
    columns(&mut got);
    assert_eq!(got, want, "mask_columns gives each slot's mask words");
    let mut g = c.benchmark_group("rlwe_masks");
    g.throughput(Throughput::Elements((COLUMNS * N) as u64));
    g.bench_function("mask_columns_per_term", |bch| {
        bch.iter(|| columns(black_box(&mut got)))
    });
    g.bench_function("one_slot_at_a_time_per_term", |bch| {
        bch.iter(|| one_at_a_time(black_box(&mut want)))
    });
    g.finish();
}

fn bench_server(c: &mut Criterion) {
    let mut g = c.benchmark_group("rlwe_server");
    g.sample_size(10);
    let seed = Seed([3; 32]);
    let mut a = vec![0u64; N];
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("expand_a_per_coefficient", |bch| {
        bch.iter(|| rlwe::expand_a(black_box(&seed), 7, 0, &mut a))
    });
    // (in, out, width): mlp.c_fc-like rows and mlp.c_proj's 3072 inputs, each over both halves
    // (a ‖ b, 2N words) and a tile of 16 outputs, on the scalar kernel and on the one this CPU
    // dispatches to. With 16 outputs each word is used 16 times and the SIMD kernel waits on
    // memory for much of the time; the last shape (128 outputs over a 1024-word column tile) shows
    // its arithmetic rate.
    let simd = kernels::isa().name();
    for (in_dim, out_dim, width) in [(768, 16, 2 * N), (3072, 16, 2 * N), (3072, 128, 1024)] {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let x: Vec<u64> = (0..in_dim * width).map(|_| rng.next_u64()).collect();
        let w: Vec<u8> = (0..in_dim * out_dim)
            .map(|_| rng.next_u32() as u8)
            .collect();
        let mut y = vec![0u64; out_dim * width];
        let shape = format!("{in_dim}x{out_dim}x{width}");
        g.throughput(Throughput::Elements((in_dim * out_dim * width) as u64));
        g.bench_function(BenchmarkId::new("gemm_i8_u64/scalar", &shape), |bch| {
            bch.iter(|| {
                kernels::scalar::gemm_i8_u64(black_box(&x), &w, in_dim, out_dim, width, &mut y)
            })
        });
        g.bench_function(
            BenchmarkId::new(format!("gemm_i8_u64/{simd}"), &shape),
            |bch| bch.iter(|| rlwe::gemm_i8_u64(black_box(&x), &w, in_dim, out_dim, width, &mut y)),
        );
    }
    g.finish();
}

criterion_group!(benches, bench_client, bench_masks, bench_server);
criterion_main!(benches);
