//! Resolving `--model`: a local checkpoint directory, or a Hugging Face Hub id fetched into the
//! standard hub cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
//!
//! Files already in the cache are used without touching the network, so a model downloaded once
//! (by this tool or by Python's `huggingface_hub`, which shares the layout) keeps working offline.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::hf::{CONFIG_FILE, MODEL_FILE};
use crate::llama::{GENERATION_CONFIG_FILE, INDEX_FILE, TOKENIZER_CONFIG_FILE};
use crate::tokenizer::TOKENIZER_FILE;

/// The files a model needs, in the order they are fetched.
pub const MODEL_FILES: [&str; 3] = [CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE];

/// Why `--model` could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The argument looks like a filesystem path, but no directory is there.
    #[error(
        "{}: no such model directory (expected a directory with {CONFIG_FILE}, {MODEL_FILE} and \
         {TOKENIZER_FILE}, or a Hugging Face Hub id such as `distilgpt2`)",
        path.display()
    )]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// The hub client could not be set up or a file could not be downloaded.
    #[error(
        "could not download `{file}` of `{repo}` from the Hugging Face Hub: {message}\n\
         If this machine is offline or cannot reach the hub, download the model elsewhere \
         (the files {CONFIG_FILE}, {MODEL_FILE} and {TOKENIZER_FILE} of `{repo}`), copy them \
         into one directory and pass `--model <local dir>`. If the repository is gated (status \
         401 or 403, as meta-llama's are), accept its licence on its page at huggingface.co and \
         give an access token in HF_TOKEN (or log in with `huggingface-cli login`)."
    )]
    Download {
        /// The hub id.
        repo: String,
        /// The file that failed.
        file: String,
        /// The hub client's error, rendered (its type is not part of our API).
        message: String,
    },
}

/// Where a resolved model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// `model.safetensors`.
    pub model: PathBuf,
    /// `tokenizer.json` (may not exist for a local directory; the tokenizer loader reports that).
    pub tokenizer: PathBuf,
}

impl ModelFiles {
    /// The files of a local checkpoint directory.
    pub fn in_dir(dir: &Path) -> Self {
        ModelFiles {
            config: dir.join(CONFIG_FILE),
            model: dir.join(MODEL_FILE),
            tokenizer: dir.join(TOKENIZER_FILE),
        }
    }
}

/// Options for [`resolve_model`]. `Default` reads `HF_HOME`/`HF_ENDPOINT` like the Python client.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Hub cache directory (the `hub` folder itself); `None` = `$HF_HOME/hub` or
    /// `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Hub endpoint; `None` = `$HF_ENDPOINT` or `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Show download progress bars.
    pub progress: bool,
    /// Access token for gated repositories (meta-llama's); `None` = `$HF_TOKEN`, else the token
    /// file `huggingface-cli login` writes (`$HF_HOME/token`), as the Python client does.
    pub token: Option<String>,
}

/// Resolves `spec`: an existing directory is used as-is; something that looks like a path but is
/// not a directory is an error; anything else is a hub id (`distilgpt2`, `openai-community/gpt2`)
/// whose files are taken from the cache or downloaded into it.
pub fn resolve_model(spec: &str, options: &HubOptions) -> Result<ModelFiles, HubError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(ModelFiles::in_dir(path));
    }
    if !looks_like_hub_id(spec) || path.exists() {
        return Err(HubError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    download(spec, options)
}

/// Hub ids are `name` or `owner/name` with characters from `[A-Za-z0-9._-]`, not starting with a
/// dot; anything else (absolute paths, `./x`, `a/b/c`, `~`) is meant as a path.
fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

fn download(repo_id: &str, options: &HubOptions) -> Result<ModelFiles, HubError> {
    let fail = |file: &str, message: String| HubError::Download {
        repo: repo_id.to_string(),
        file: file.to_string(),
        message,
    };
    let cache = match &options.cache_dir {
        Some(dir) => Cache::new(dir.clone()),
        None => Cache::from_env(),
    };
    let repo = Repo::new(repo_id.to_string(), RepoType::Model);

    // Offline first: a complete cached snapshot needs no network (hf-hub's `get` would also check
    // the cache, but only file by file, and would build a TLS client we do not need).
    let cached = cache.repo(repo.clone());
    if let [Some(config), Some(model), Some(tokenizer)] = MODEL_FILES.map(|f| cached.get(f)) {
        return Ok(ModelFiles {
            config,
            model,
            tokenizer,
        });
    }
    // A sharded checkpoint (the larger LLaMA-family models) is complete with its index and
    // every shard it names.
    if let (Some(config), Some(index), Some(tokenizer)) = (
        cached.get(CONFIG_FILE),
        cached.get(INDEX_FILE),
        cached.get(TOKENIZER_FILE),
    ) {
        if let Some(shards) = shard_names(&index) {
            if shards.iter().all(|f| cached.get(f).is_some()) {
                let model = index.with_file_name(MODEL_FILE);
                return Ok(ModelFiles {
                    config,
                    model,
                    tokenizer,
                });
            }
        }
    }

    let mut builder = ApiBuilder::from_env().with_progress(options.progress);
    if let Some(dir) = &options.cache_dir {
        builder = builder.with_cache_dir(dir.clone());
    }
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    // hf-hub reads only the token file; the Python client also honours `HF_TOKEN`, which is how
    // most people give one. Without either, hf-hub's own (the file's, if any) stays.
    let token = options
        .token
        .clone()
        .or_else(|| std::env::var("HF_TOKEN").ok())
        .filter(|t| !t.is_empty());
    if token.is_some() {
        builder = builder.with_token(token);
    }
    let api = builder
        .build()
        .map_err(|e| fail(CONFIG_FILE, e.to_string()))?;
    let api_repo = api.repo(repo);
    let get = |file: &str| api_repo.get(file).map_err(|e| fail(file, e.to_string()));
    let config = get(CONFIG_FILE)?;
    let llama = crate::llama::model_type(&config)
        .map(|t| crate::llama::is_llama_family(&t))
        .unwrap_or(false);
    if !llama {
        return Ok(ModelFiles {
            config,
            model: get(MODEL_FILE)?,
            tokenizer: get(TOKENIZER_FILE)?,
        });
    }
    let tokenizer = get(TOKENIZER_FILE)?;
    // Optional: BOS/EOS for generation, and the chat template. A repository without them is
    // still usable (config.json has the ids), so a failure here is not an error.
    for f in [GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE] {
        let _ = api_repo.get(f);
    }
    let model = match api_repo.get(MODEL_FILE) {
        Ok(m) => m,
        Err(single) => {
            let index = api_repo
                .get(INDEX_FILE)
                .map_err(|_| fail(MODEL_FILE, single.to_string()))?;
            let shards = shard_names(&index)
                .ok_or_else(|| fail(INDEX_FILE, "not a safetensors index".into()))?;
            for f in &shards {
                get(f)?;
            }
            // Not a file: the loader then reads the index beside the config.
            index.with_file_name(MODEL_FILE)
        }
    };
    Ok(ModelFiles {
        config,
        model,
        tokenizer,
    })
}

/// The shard file names a `model.safetensors.index.json` lists (`None` if it is not one).
fn shard_names(index: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(index).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let mut names: Vec<String> = v
        .get("weight_map")?
        .as_object()?
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::looks_like_hub_id;

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        for id in [
            "distilgpt2",
            "openai-community/gpt2",
            "gpt2-medium",
            "a.b/c_d",
        ] {
            assert!(looks_like_hub_id(id), "{id}");
        }
        for path in ["/tmp/x", "./x", "../x", "a/b/c", "~/m", "", "a//b", "x/"] {
            assert!(!looks_like_hub_id(path), "{path}");
        }
    }
}
