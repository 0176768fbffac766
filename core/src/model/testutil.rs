//! A random model in Veil's format, for tests of the forward pass (no float reference involved).

use super::config::ModelConfig;
use super::format::*;
use crate::quant::{BlockI16, ChannelScale};
use std::vec;
use std::vec::Vec;

pub(crate) struct RandomModel {
    pub cfg: ModelConfig,
    pub client: Vec<u8>,
    pub linear: Vec<u8>,
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 30) as f64 - 1.0
    }
}

impl RandomModel {
    pub fn new(seed: u64) -> Self {
        let cfg = ModelConfig {
            n_layer: 2,
            n_embd: 16,
            n_head: 2,
            n_positions: 12,
            vocab_size: 70,
            n_inner: 64,
            family: super::Family::Gpt2,
        };
        Self::with_config(seed, cfg)
    }

    /// A LLaMA-family model: 4 query heads sharing 2 KV heads of width 8, q|k|v biases (Qwen2),
    /// RoPE with Llama 3 scaling.
    pub fn llama(seed: u64) -> Self {
        let cfg = ModelConfig {
            n_layer: 2,
            n_embd: 32,
            n_head: 4,
            n_positions: 12,
            vocab_size: 70,
            n_inner: 48,
            family: super::Family::Llama {
                n_kv_head: 2,
                qkv_bias: true,
            },
        };
        Self::with_config(seed, cfg)
    }

    pub fn with_config(seed: u64, cfg: ModelConfig) -> Self {
        let mut rng = Lcg(seed);
        let ll = LinearLayout::new(&cfg);
        let mut linear = vec![0u8; ll.total_len];
        let mut h = [0u8; HEADER_LEN];
        encode_linear_header(&cfg, &mut h);
        linear[..HEADER_LEN].copy_from_slice(&h);
        for id in cfg.linears() {
            for b in &mut linear[ll.matrix(id)] {
                *b = ((rng.next() % 255) as i32 - 127) as i8 as u8;
            }
        }
        let cl = ClientLayout::new(&cfg);
        let mut client = vec![0u8; cl.total_len];
        let header = ClientHeader {
            config: cfg,
            ln_eps_q32: 42950,
            eos_token_id: 0,
            linear_fingerprint: [0; 32],
            rope: if cfg.is_llama() {
                crate::rope::RopeConfig {
                    theta: 10000.0,
                    scaling: crate::rope::RopeScaling::Llama3(crate::rope::Llama3Scaling {
                        factor: 8.0,
                        low_freq_factor: 1.0,
                        high_freq_factor: 4.0,
                        original_max_positions: 4,
                    }),
                }
            } else {
                crate::rope::RopeConfig::NONE
            },
            bos_token_id: cfg.is_llama().then_some(1),
        };
        encode_client_header(&header, &mut h);
        client[..HEADER_LEN].copy_from_slice(&h);
        let d = cfg.d();
        let put_i32 = |buf: &mut [u8], vals: &mut dyn FnMut() -> i32| {
            for c in buf.chunks_exact_mut(4) {
                c.copy_from_slice(&vals().to_le_bytes());
            }
        };
        for (table, shifts, rows) in [
            (
                cl.wte.clone(),
                cl.wte_shift.clone(),
                cfg.vocab_size as usize,
            ),
            (
                cl.wpe.clone(),
                cl.wpe_shift.clone(),
                // The LLaMA family has no position table.
                cl.wpe_shift.len(),
            ),
        ] {
            for r in 0..rows {
                let row: Vec<i32> = (0..d).map(|_| crate::fixed::from_f64(rng.unit())).collect();
                let mut q = vec![0i16; d];
                let s = BlockI16::encode(&row, &mut q);
                client[shifts.start + r] = s;
                for (i, v) in q.iter().enumerate() {
                    let at = table.start + 2 * (r * d + i);
                    client[at..at + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        let scale = ChannelScale::from_weight_scale(0.3 / 127.0 / 4.0);
        let fill_linear = |client: &mut [u8], p: &LinearParamsLayout, rng: &mut Lcg| {
            if let Some(b) = &p.bias {
                put_i32(&mut client[b.clone()], &mut || {
                    crate::fixed::from_f64(rng.unit() * 0.1)
                });
            }
            put_i32(&mut client[p.mult.clone()], &mut || scale.mult);
            client[p.shift.clone()].fill(scale.shift);
        };
        let fill_ln = |client: &mut [u8], ln: &[core::ops::Range<usize>; 2], rng: &mut Lcg| {
            for c in client[ln[0].clone()].chunks_exact_mut(4) {
                c.copy_from_slice(&crate::fixed::from_f64(1.0 + 0.2 * rng.unit()).to_le_bytes());
            }
            for c in client[ln[1].clone()].chunks_exact_mut(4) {
                c.copy_from_slice(&crate::fixed::from_f64(0.1 * rng.unit()).to_le_bytes());
            }
        };
        for l in 0..cfg.n_layer as usize {
            let b = cl.block(l);
            fill_ln(&mut client, &b.ln1, &mut rng);
            fill_ln(&mut client, &b.ln2, &mut rng);
            for p in &b.linears {
                fill_linear(&mut client, p, &mut rng);
            }
        }
        fill_ln(&mut client, &cl.ln_f, &mut rng);
        fill_linear(&mut client, &cl.lm_head, &mut rng);
        RandomModel {
            cfg,
            client,
            linear,
        }
    }
}

/// Host-side buffers of one private forward pass over a test model.
pub(crate) struct Bufs {
    i32s: Vec<i32>,
    i8s: Vec<i8>,
    k: Vec<i16>,
    v: Vec<i16>,
    ks: Vec<u8>,
    vs: Vec<u8>,
    w: [Vec<u32>; 4],
}

/// Buffers for steps of up to `rows` rows over the model's whole context.
pub(crate) fn bufs(cfg: &ModelConfig, rows: usize) -> Bufs {
    use super::{KvSizes, LogitRows, WorkspaceSizes};
    let cap = cfg.n_positions as usize;
    let ws = WorkspaceSizes::new(cfg, rows, LogitRows::Last, cap);
    let kv = KvSizes::new(cfg, cap);
    let s = crate::session::SessionSizes::new(cfg, rows);
    Bufs {
        i32s: vec![0; ws.i32_len],
        i8s: vec![0; ws.i8_len],
        k: vec![0; kv.values],
        v: vec![0; kv.values],
        ks: vec![0; kv.shifts],
        vs: vec![0; kv.shifts],
        w: [
            vec![0; s.input_words],
            vec![0; s.input_words],
            vec![0; s.output_words],
            vec![0; s.output_words],
        ],
    }
}

/// A forward pass over `b` and the four session word buffers (masked, r, y, u).
pub(crate) fn forward<'w, 'a>(
    m: &'w RandomModel,
    b: &'a mut Bufs,
    rows: usize,
) -> (super::Forward<'w, 'a>, [&'a mut Vec<u32>; 4]) {
    use super::{ClientWeights, Forward, KvCache, LogitRows, Workspace, WorkspaceSizes};
    let cw = ClientWeights::parse(&m.client).unwrap();
    let cfg = *cw.config();
    let cap = cfg.n_positions as usize;
    let ws = Workspace::new(
        &cfg,
        WorkspaceSizes::new(&cfg, rows, LogitRows::Last, cap),
        &mut b.i32s,
        &mut b.i8s,
    )
    .unwrap();
    let kv = KvCache::new(&cfg, cap, &mut b.k, &mut b.v, &mut b.ks, &mut b.vs).unwrap();
    let [a, bb, c, d] = &mut b.w;
    (Forward::new(cw, ws, kv).unwrap(), [a, bb, c, d])
}

/// Greedy tokens of the plaintext integer pipeline: what every private path must reproduce.
pub(crate) fn greedy_local(m: &RandomModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let lin = super::LinearWeights::parse(&m.linear).unwrap();
    let mut b = bufs(&m.cfg, prompt.len());
    let (mut fwd, _) = forward(m, &mut b, prompt.len());
    let mut out = vec![];
    let mut next: Vec<u32> = prompt.to_vec();
    for _ in 0..n {
        fwd.step_locally(&lin, &next).unwrap();
        let t = super::argmax(fwd.logits().unwrap());
        out.push(t);
        next = vec![t];
    }
    out
}
