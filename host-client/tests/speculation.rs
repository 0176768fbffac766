//! Speculative decoding over real TCP: greedy and seeded sampling give token for token what plain
//! decoding gives (the local reference), with the online and pool sources, the LM head offloaded
//! or local, on golden tiny and a distilgpt2-size synthetic model; drafts are really checked
//! several at a time; every row of every step takes a slot of its own, rejected rows included.

mod common;

use std::path::Path;

use common::{
    connect, golden_llama_model, golden_model, reference, shared, start_server, Recording,
};
use veil_client::files::ModelFiles;
use veil_client::generate::{generate_reference, GenOptions, GenStats, PrivateGenerator};
use veil_client::pool::PoolSource;
use veil_client::speculate::{DrafterKind, Speculation};
use veil_core::mask::MaskKey;
use veil_core::model::SamplingParams;
use veil_core::session::{OnlineUnmask, UnmaskSource};
use veil_server::ServerConfig;

const SAMPLED: SamplingParams = SamplingParams {
    temperature_q16: 58982,
    top_k: 40,
    top_p_q16: 62259,
};

fn opts(sampling: SamplingParams, n: usize, seed: u64, k: Option<usize>) -> GenOptions {
    GenOptions {
        max_new_tokens: n,
        sampling,
        seed,
        eos: vec![],
        prefill_rows: 64,
        speculation: k.map(|k| Speculation {
            drafter: DrafterKind::PromptLookup,
            max_draft: k,
            adaptive: false,
        }),
    }
}

/// A private generation with `source`; the slots it used must all differ.
fn private<S: UnmaskSource>(
    files: &ModelFiles,
    addr: std::net::SocketAddr,
    source: S,
    local_head: bool,
    prompt: &[u32],
    o: &GenOptions,
) -> (Vec<u32>, GenStats, S) {
    let mut src = Recording::new(source);
    let linear = files.linear().unwrap();
    let mut g = PrivateGenerator::new(files.client().unwrap(), connect(addr, files));
    if local_head {
        g = g.local_lm_head(linear.unwrap());
    }
    let (tokens, stats) = g.generate(&mut src, prompt, o, &mut |_| {}).unwrap();
    g.into_connection().bye();
    let mut slots: Vec<u64> = src.reserved.iter().flat_map(|&(f, n)| f..f + n).collect();
    let n = slots.len();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), n, "a slot was used twice");
    // One slot per row fed: the prompt, then every step's token and its drafts.
    assert!(n >= prompt.len() + stats.decode_steps, "{n} slots");
    (tokens, stats, src.inner)
}

fn check(dir: &Path, prompt: &[u32], n: usize) {
    let files = ModelFiles::open(dir, true).unwrap();
    let cfg = *files.client().unwrap().config();
    let fp = files.fingerprint().unwrap();
    let server = start_server(dir, ServerConfig::default());
    let linear = files.linear().unwrap().unwrap();
    let pool_path = dir.join("spec.pool");
    // Two generations per sampling mode, each at most 1 + n · (k + 1) slots, and slack.
    PoolSource::precompute(
        &pool_path,
        &linear,
        &fp,
        4 * (prompt.len() + 5 * n) as u64,
        &mut |_, _| {},
    )
    .unwrap();
    let mut pool = Some(PoolSource::open(&pool_path, &cfg, &fp).unwrap());
    for sampling in [SamplingParams::GREEDY, SAMPLED] {
        let plain = opts(sampling, n, 42, None);
        let spec = opts(sampling, n, 42, Some(4));
        let want = reference(&files, prompt, &plain);
        // The local reference speculating agrees with itself plain.
        let client = files.client().unwrap();
        let (local, local_stats) =
            generate_reference(client, &linear, prompt, &spec, &mut |_| {}).unwrap();
        assert_eq!(local, want, "{sampling:?}: local speculative");
        if sampling.is_greedy() {
            assert!(
                local_stats.tokens_per_step > 1.2,
                "drafts were kept: {} tokens per step",
                local_stats.tokens_per_step
            );
        }
        let online = OnlineUnmask::new(linear.clone(), MaskKey::from_bytes([3; 32]));
        let (t, stats, _) = private(&files, server.addr, online, true, prompt, &spec);
        assert_eq!(t, want, "{sampling:?}: online, LM head local");
        assert_eq!(stats.decode_steps, local_stats.decode_steps);
        let (t, stats, p) = private(
            &files,
            server.addr,
            pool.take().unwrap(),
            false,
            prompt,
            &spec,
        );
        assert_eq!(t, want, "{sampling:?}: pool, LM head offloaded");
        assert!(
            stats.round_trips_per_token < 4.0 * cfg.n_layer as f64 + 1.0 || !sampling.is_greedy()
        );
        pool = Some(p);
    }
    pool.unwrap().close().unwrap();
}

#[test]
fn speculative_decoding_equals_plain_decoding_on_golden_tiny() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    // WikiText-2 text (the model's own domain), tokenized as the client does.
    let files = ModelFiles::open(&dir, true).unwrap();
    let text = std::fs::read_to_string(shared().join("data/wikitext-2/test.txt")).unwrap();
    let text: String = text.chars().skip(200).take(400).collect();
    let prompt = files.tokenizer().unwrap().encode(text, false).unwrap();
    check(&dir, prompt.get_ids(), 40);
}

/// The LLaMA family: drafted rows are rotated at their own positions, and a rejected draft's
/// positions are rotated afresh when refilled.
#[test]
fn speculative_decoding_equals_plain_decoding_on_golden_tiny_llama() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_llama_model(tmp.path());
    let files = ModelFiles::open(&dir, true).unwrap();
    let text = std::fs::read_to_string(shared().join("data/wikitext-2/test.txt")).unwrap();
    let text: String = text.chars().skip(200).take(400).collect();
    let prompt = files.tokenizer().unwrap().encode(text, true).unwrap();
    check(&dir, prompt.get_ids(), 40);
}

#[test]
fn speculative_decoding_equals_plain_decoding_on_synthetic_distilgpt2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_distilgpt2(tmp.path());
    check(&dir, &[464, 3290, 286, 262, 7993, 8065, 373, 9], 12);
}

/// Seeded sampling with speculation is the same random process as without: for every seed the
/// same tokens (a test on the sequences themselves, stronger than comparing their distributions:
/// any two-sample test of the two would see identical samples, statistic 0, p = 1). The seeds
/// give different sequences, so the sampling is live.
#[test]
fn seeded_speculative_sampling_is_plain_sampling_seed_by_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let files = ModelFiles::open(&dir, true).unwrap();
    let linear = files.linear().unwrap().unwrap();
    let prompt = [464u32, 3290, 286, 262, 1279, 2954, 29, 837];
    let mut distinct = std::collections::HashSet::new();
    for seed in 0..100 {
        let plain = reference(&files, &prompt, &opts(SAMPLED, 16, seed, None));
        let (spec, _) = generate_reference(
            files.client().unwrap(),
            &linear,
            &prompt,
            &opts(SAMPLED, 16, seed, Some(4)),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(spec, plain, "seed {seed}");
        distinct.insert(plain);
    }
    assert!(distinct.len() > 50, "{} distinct samples", distinct.len());
}
