//! The model (GPT-2 or the LLaMA family): configuration, on-disk weight format, KV cache, the sans-IO forward pass and
//! sampling.

mod config;
pub mod format;
mod forward;
mod kv;
mod sample;
#[cfg(test)]
pub(crate) mod testutil;

pub use config::{ConfigError, Family, LinearId, LinearKind, ModelConfig, MAX_POSITIONS};
pub use format::{ClientWeights, FormatError, LinearWeights};
pub use forward::{
    Forward, ForwardError, LinearRequest, LogitRows, StepState, Workspace, WorkspaceSizes,
    MAX_HEAD_DIM,
};
pub use kv::{KvCache, KvSizes};
pub use sample::{argmax, sample, SampleError, SamplingParams};
