//! Where a model's files come from: a preset, a Hub repo id or a local
//! directory; and fetching them through `hf-hub` with the standard cache.
//!
//! Environment honoured (as `huggingface_hub` does):
//! - `HF_HUB_CACHE` (else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`);
//! - `HF_TOKEN` (else the token file `$HF_HOME/token`, else `~/.cache/huggingface/token`),
//!   needed for gated repos such as Llama-3;
//! - `HF_HUB_OFFLINE=1`: use the cache only and never touch the network;
//! - `HF_ENDPOINT`: another Hub address.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::presets::{PRESETS, preset_names};
use crate::{ModelError, Result};

/// What `--model` named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub { repo: String, revision: String },
}

impl ModelSource {
    /// Resolves `--model`: a preset alias, an existing directory, or `owner/name`.
    pub fn parse(arg: &str, revision: &str) -> Result<Self> {
        if let Some(p) = PRESETS.iter().find(|p| p.alias.eq_ignore_ascii_case(arg)) {
            return Ok(Self::Hub {
                repo: p.repo.into(),
                revision: revision.into(),
            });
        }
        let path = Path::new(arg);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        if path.exists() {
            return Err(ModelError::MissingPath {
                path: arg.into(),
                reason: "is a file, expected the model's directory".into(),
            });
        }
        let looks_like_path =
            arg.starts_with(['.', '/', '~']) || arg.matches('/').count() > 1 || arg.contains('\\');
        if looks_like_path {
            return Err(ModelError::MissingPath {
                path: arg.into(),
                reason: "does not exist".into(),
            });
        }
        if is_repo_id(arg) {
            return Ok(Self::Hub {
                repo: arg.into(),
                revision: revision.into(),
            });
        }
        Err(ModelError::UnknownModel {
            name: arg.into(),
            presets: preset_names(),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Local(p) => p.display().to_string(),
            Self::Hub { repo, revision } if revision == "main" => repo.clone(),
            Self::Hub { repo, revision } => format!("{repo}@{revision}"),
        }
    }
}

fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// Which tokenizer file a checkpoint ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerFile {
    /// Hugging Face `tokenizer.json`.
    Json(PathBuf),
    /// SentencePiece `tokenizer.model` only (Yi repos).
    SentencePiece(PathBuf),
}

/// The local paths of everything a model needs.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub source: ModelSource,
    pub config: PathBuf,
    pub generation_config: Option<PathBuf>,
    /// `tokenizer_config.json`, when the checkpoint has one (its
    /// `chat_template` and special tokens).
    pub tokenizer_config: Option<PathBuf>,
    /// One file, or every shard named by `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
    pub tokenizer: TokenizerFile,
}

/// How to reach the Hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    /// Show download progress bars.
    pub progress: bool,
    pub endpoint: Option<String>,
}

impl HubOptions {
    /// Reads the standard `HF_*` environment variables.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home_dir = var("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        let hf_home = var("HF_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| home_dir.join(".cache/huggingface"));
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            let t = std::fs::read_to_string(hf_home.join("token")).ok()?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Self {
            cache_dir,
            token,
            offline,
            progress: true,
            endpoint: var("HF_ENDPOINT"),
        }
    }
}

/// A place files are looked up by name: a directory, the Hub cache, or the Hub.
trait FileStore {
    /// The names of all files the store holds.
    fn list(&self) -> Result<BTreeSet<String>>;
    /// A local path for `name`, downloading it if needed.
    fn fetch(&self, name: &str) -> Result<PathBuf>;
    fn location(&self) -> String;
}

/// Finds (and downloads when online) the config, weights and tokenizer.
pub fn fetch_model_files(source: &ModelSource, opts: &HubOptions) -> Result<ModelFiles> {
    let (store, files): (Box<dyn FileStore>, _) = match source {
        ModelSource::Local(dir) => {
            let store = LocalDir(dir.clone());
            let files = store.list()?;
            (Box::new(store), files)
        }
        ModelSource::Hub { repo, revision } if opts.offline => {
            let store = CacheSnapshot::open(&opts.cache_dir, repo, revision)?;
            let files = store.list()?;
            (Box::new(store), files)
        }
        ModelSource::Hub { repo, revision } => {
            let online = OnlineRepo::new(opts, repo, revision)?;
            match online.list() {
                Ok(files) => (Box::new(online), files),
                // The Hub is unreachable but an earlier download is cached:
                // use it, and say so.
                Err(e) => match CacheSnapshot::open(&opts.cache_dir, repo, revision) {
                    Ok(cached) => {
                        eprintln!(
                            "warning: {e}\nwarning: using the cached snapshot {}",
                            cached.dir.display()
                        );
                        let files = cached.list()?;
                        (Box::new(cached), files)
                    }
                    Err(_) => return Err(e),
                },
            }
        }
    };
    let missing = |what: &str, hint: &str| ModelError::MissingFile {
        what: what.into(),
        location: store.location(),
        hint: hint.into(),
    };
    if !files.contains("config.json") {
        return Err(missing("config.json", ""));
    }
    let config = store.fetch("config.json")?;
    let generation_config = match files.contains("generation_config.json") {
        true => Some(store.fetch("generation_config.json")?),
        false => None,
    };
    let tokenizer_config = match files.contains("tokenizer_config.json") {
        true => Some(store.fetch("tokenizer_config.json")?),
        false => None,
    };
    let tokenizer = if files.contains("tokenizer.json") {
        TokenizerFile::Json(store.fetch("tokenizer.json")?)
    } else if files.contains("tokenizer.model") {
        TokenizerFile::SentencePiece(store.fetch("tokenizer.model")?)
    } else {
        return Err(missing("tokenizer (tokenizer.json or tokenizer.model)", ""));
    };
    let weight_names: Vec<String> = if files.contains("model.safetensors.index.json") {
        let index = store.fetch("model.safetensors.index.json")?;
        shard_names(&index)?
    } else if files.contains("model.safetensors") {
        vec!["model.safetensors".into()]
    } else {
        let hint = if files.iter().any(|f| f.ends_with(".bin")) {
            " (only PyTorch .bin weights were found: convert them to safetensors)"
        } else {
            ""
        };
        return Err(missing(
            "weights (model.safetensors or model.safetensors.index.json)",
            hint,
        ));
    };
    let mut weights = Vec::with_capacity(weight_names.len());
    for name in &weight_names {
        if !files.contains(name) {
            return Err(missing(name, " (named by model.safetensors.index.json)"));
        }
        weights.push(store.fetch(name)?);
    }
    Ok(ModelFiles {
        source: source.clone(),
        config,
        generation_config,
        tokenizer_config,
        weights,
        tokenizer,
    })
}

/// The shard files named by a `model.safetensors.index.json`, each once, sorted.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let bad = |reason: String| ModelError::BadConfig {
        path: index.display().to_string(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no weight_map object".into()))?;
    let names: BTreeSet<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    if names.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    Ok(names.into_iter().collect())
}

struct LocalDir(PathBuf);

impl FileStore for LocalDir {
    fn list(&self) -> Result<BTreeSet<String>> {
        let rd = std::fs::read_dir(&self.0).map_err(|e| ModelError::io(&self.0, e))?;
        Ok(rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect())
    }
    fn fetch(&self, name: &str) -> Result<PathBuf> {
        Ok(self.0.join(name))
    }
    fn location(&self) -> String {
        self.0.display().to_string()
    }
}

/// One snapshot of a repo in the Hub cache layout:
/// `<cache>/models--owner--name/{refs/<revision>, snapshots/<commit>/<file>}`.
struct CacheSnapshot {
    dir: PathBuf,
    repo: String,
}

impl CacheSnapshot {
    fn open(cache: &Path, repo: &str, revision: &str) -> Result<Self> {
        let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        let offline_err = |why: String| ModelError::Hub {
            repo: repo.into(),
            reason: format!(
                "{why}; HF_HUB_OFFLINE is set, so nothing is downloaded (cache: {})",
                cache.display()
            ),
        };
        if !repo_dir.is_dir() {
            return Err(offline_err("the repo is not in the Hub cache".into()));
        }
        // A branch or tag resolves through refs/; a commit hash names the snapshot directly.
        let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
            Ok(c) => c.trim().to_string(),
            Err(_) => revision.to_string(),
        };
        let dir = repo_dir.join("snapshots").join(&commit);
        if !dir.is_dir() {
            return Err(offline_err(format!("revision '{revision}' is not in the cache")));
        }
        Ok(Self {
            dir,
            repo: repo.into(),
        })
    }
}

impl FileStore for CacheSnapshot {
    fn list(&self) -> Result<BTreeSet<String>> {
        LocalDir(self.dir.clone()).list()
    }
    fn fetch(&self, name: &str) -> Result<PathBuf> {
        Ok(self.dir.join(name))
    }
    fn location(&self) -> String {
        format!("the cached Hub repo {} ({})", self.repo, self.dir.display())
    }
}

struct OnlineRepo {
    api: hf_hub::api::sync::ApiRepo,
    repo: String,
    has_token: bool,
}

impl OnlineRepo {
    fn new(opts: &HubOptions, repo: &str, revision: &str) -> Result<Self> {
        let mut b = ApiBuilder::from_cache(hf_hub::Cache::new(opts.cache_dir.clone()))
            .with_token(opts.token.clone())
            .with_progress(opts.progress);
        if let Some(e) = &opts.endpoint {
            b = b.with_endpoint(e.clone());
        }
        let api = b.build().map_err(|e| ModelError::Hub {
            repo: repo.into(),
            reason: e.to_string(),
        })?;
        let api = api.repo(Repo::with_revision(repo.into(), RepoType::Model, revision.into()));
        Ok(Self {
            api,
            repo: repo.into(),
            has_token: opts.token.is_some(),
        })
    }

    fn error(&self, e: hf_hub::api::sync::ApiError) -> ModelError {
        let msg = e.to_string();
        let hint = if msg.contains("401") || msg.contains("403") {
            if self.has_token {
                " (access denied: this repo may be gated; accept its licence on huggingface.co with the account of HF_TOKEN)"
            } else {
                " (access denied: gated repos such as Llama-3 need a token: set HF_TOKEN or run `hf auth login`)"
            }
        } else if msg.contains("404") {
            " (no such repo or revision)"
        } else {
            " (no network? set HF_HUB_OFFLINE=1 to use the cache only)"
        };
        ModelError::Hub {
            repo: self.repo.clone(),
            reason: format!("{msg}{hint}"),
        }
    }
}

impl FileStore for OnlineRepo {
    fn list(&self) -> Result<BTreeSet<String>> {
        let info = self.api.info().map_err(|e| self.error(e))?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }
    fn fetch(&self, name: &str) -> Result<PathBuf> {
        self.api.get(name).map_err(|e| self.error(e))
    }
    fn location(&self) -> String {
        format!("the Hub repo {}", self.repo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_arguments() {
        assert_eq!(
            ModelSource::parse("llama3-8b", "main").unwrap(),
            ModelSource::Hub {
                repo: "meta-llama/Meta-Llama-3-8B".into(),
                revision: "main".into()
            }
        );
        assert!(matches!(
            ModelSource::parse("01-ai/Yi-6B", "v1").unwrap(),
            ModelSource::Hub { revision, .. } if revision == "v1"
        ));
        let err = ModelSource::parse("yi-7b", "main").unwrap_err().to_string();
        assert!(err.contains("yi-6b, llama3-8b, yi-34b"), "{err}");
        let err = ModelSource::parse("./no/such/dir", "main").unwrap_err();
        assert!(matches!(err, ModelError::MissingPath { .. }), "{err}");
        let tmp = std::env::temp_dir();
        assert_eq!(
            ModelSource::parse(tmp.to_str().unwrap(), "main").unwrap(),
            ModelSource::Local(tmp)
        );
    }
}
