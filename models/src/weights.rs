//! Memory-mapped safetensors, single-file or sharded, read tensor by tensor
//! into the compute dtype.
//!
//! Each tensor is converted as it is requested and the mapping is only read,
//! so loading holds one copy of the weights in the compute dtype plus at most
//! one tensor in flight in the file's dtype (the "+25 %" budget: the largest
//! tensor of a Llama-3-8B is its 1 GB embedding, 6 % of the model).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::{ModelError, Result};

/// Lazily loaded weights of one checkpoint.
pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name -> index into `files`
    route: HashMap<String, usize>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>())
            .field("tensors", &self.route.len())
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Weights {
    /// Maps every file and reads its header; a truncated or corrupt file is
    /// reported here, by path, before any tensor is loaded.
    pub fn open(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut route = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let corrupt = |reason: String| ModelError::CorruptWeights {
                path: path.clone(),
                reason,
            };
            if !path.is_file() {
                return Err(ModelError::MissingFile {
                    what: path
                        .file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into()),
                    location: path
                        .parent()
                        .map_or_else(String::new, |p| p.display().to_string()),
                    hint: String::new(),
                });
            }
            // SAFETY: the file is mapped read-only; like every mmap-based
            // loader we rely on it not being truncated while we run.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| corrupt(e.to_string()))?;
            for (name, _) in st.tensors() {
                route.insert(name, i);
            }
            files.push((path.clone(), st));
        }
        Ok(Self {
            files,
            route,
            dtype,
            device: device.clone(),
        })
    }

    fn location(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            files => format!("{} shards in {}", files.len(), parent(&files[0].0)),
        }
    }
}

/// Where the model's tensors come from: a checkpoint ([`Weights`]) or random
/// values of the right shapes ([`SyntheticWeights`]).
pub trait TensorSource {
    /// Tensor `name` with exactly `shape`, in [`Self::dtype`] on [`Self::device`].
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
}

impl TensorSource for Weights {
    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn contains(&self, name: &str) -> bool {
        self.route.contains_key(name)
    }

    /// Loads `name`, checks it has `shape`, converts it to the compute dtype.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(&i) = self.route.get(name) else {
            return Err(ModelError::MissingTensor {
                name: name.into(),
                location: self.location(),
            });
        };
        let (path, st) = &self.files[i];
        let view = st.get(name).map_err(|e| corrupt(path, e))?;
        if view.shape() != shape {
            return Err(ModelError::WrongShape {
                name: name.into(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
                file: path.clone(),
            });
        }
        let t = st.load(name, &self.device).map_err(|e| corrupt(path, e))?;
        Ok(t.to_dtype(self.dtype)?)
    }
}

/// Random weights with a checkpoint's exact names and shapes, made directly
/// on the device: full-size benchmarks with no download. Matrices are
/// N(0, 0.02) (transformers' initializer), norm weights are 1.
#[derive(Debug)]
pub struct SyntheticWeights {
    dtype: DType,
    device: Device,
}

impl SyntheticWeights {
    /// Seeds the device's generator so that a run is reproducible.
    pub fn new(dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        device.set_seed(seed)?;
        Ok(Self {
            dtype,
            device: device.clone(),
        })
    }
}

impl TensorSource for SyntheticWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, self.dtype, &self.device)?
        } else {
            // Generated in f32 (every backend supports it) and converted.
            Tensor::randn(0f32, 0.02, shape, &self.device)?.to_dtype(self.dtype)?
        };
        Ok(t)
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

fn parent(p: &Path) -> String {
    p.parent().map_or_else(String::new, |d| d.display().to_string())
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::CorruptWeights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}
