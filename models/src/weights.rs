//! Memory-mapped safetensors, single-file or sharded, read tensor by tensor
//! into the compute dtype.
//!
//! Each tensor is converted as it is requested, and once it has been copied
//! out, the pages of the mapping that held it are released
//! (`MADV_DONTNEED`), so loading holds one copy of the weights in the compute
//! dtype (on the GPU, none on the host) plus at most one tensor in flight:
//! the process's resident memory stays far below the checkpoint's size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

use crate::{ModelError, Result};

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (after the 8-byte length and the JSON header).
    data_start: usize,
}

/// Where one tensor's bytes are.
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range within the file's data section.
    range: (usize, usize),
}

/// Lazily loaded weights of one checkpoint.
pub struct Weights {
    files: Vec<MappedFile>,
    route: HashMap<String, Entry>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.files.iter().map(|m| &m.path).collect::<Vec<_>>())
            .field("tensors", &self.route.len())
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Weights {
    /// Maps every file and validates its header against its length; a
    /// truncated or corrupt file is reported here, by path, before any
    /// tensor is loaded.
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
            let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the file is mapped read-only; like every mmap-based
            // loader we rely on it not being truncated while we run.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            // deserialize() checks that the header's offsets cover the file exactly.
            SafeTensors::deserialize(&mmap).map_err(|e| corrupt(e.to_string()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| corrupt(e.to_string()))?;
            for (name, info) in meta.tensors() {
                let entry = Entry {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    range: info.data_offsets,
                };
                route.insert(name, entry);
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
            });
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
            [f] => f.path.display().to_string(),
            files => format!("{} shards in {}", files.len(), parent(&files[0].path)),
        }
    }
}

/// Where the model's tensors come from: a checkpoint ([`Weights`]) or random
/// values of the right shapes ([`SyntheticWeights`]).
pub trait TensorSource {
    /// Tensor `name` with exactly `shape`, in [`Self::dtype`] on [`Self::device`].
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Indices `range` along `dim` (0 or 1) of the 2-D tensor `name`, which
    /// must have exactly `shape` (a tensor-parallel rank's slice). The
    /// default loads the whole tensor and narrows it; checkpoints read only
    /// the slice's bytes.
    fn get_slice(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        range: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        check_slice(name, shape, dim, &range)?;
        Ok(self
            .get(name, shape)?
            .narrow(dim, range.start, range.len())?
            .contiguous()?)
    }
    fn contains(&self, name: &str) -> bool;
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
}

/// A slice request a 2-D tensor can serve.
fn check_slice(name: &str, shape: &[usize], dim: usize, range: &std::ops::Range<usize>) -> Result<()> {
    if shape.len() != 2 || dim > 1 || range.start >= range.end || range.end > shape[dim] {
        return Err(ModelError::TensorParallel(format!(
            "cannot slice {range:?} along dim {dim} of tensor '{name}' of shape {shape:?}"
        )));
    }
    Ok(())
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

    /// Loads `name`, checks it has `shape`, converts it to the compute dtype,
    /// and lets the kernel drop the mapped pages it came from.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (e, f, _) = self.checked(name, shape)?;
        let (start, end) = (f.data_start + e.range.0, f.data_start + e.range.1);
        let t = self.upload(f, e, e.shape.clone(), &f.mmap[start..end])?;
        release_pages(&f.mmap, start, end);
        Ok(t)
    }

    /// Reads only the slice's bytes from the mapped file: rows are one
    /// contiguous range; columns are gathered row by row on the host.
    fn get_slice(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        range: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        check_slice(name, shape, dim, &range)?;
        let (e, f, elem) = self.checked(name, shape)?;
        let (rows, cols) = (shape[0], shape[1]);
        let (start, end) = (f.data_start + e.range.0, f.data_start + e.range.1);
        if end - start != rows * cols * elem {
            return Err(corrupt(
                &f.path,
                format!(
                    "tensor '{name}' has {} bytes, not {rows} x {cols} x {elem}",
                    end - start
                ),
            ));
        }
        let bytes = &f.mmap[start..end];
        let row = cols * elem;
        if dim == 0 {
            let t = self.upload(
                f,
                e,
                vec![range.len(), cols],
                &bytes[range.start * row..range.end * row],
            )?;
            release_pages(&f.mmap, start + range.start * row, start + range.end * row);
            return Ok(t);
        }
        let take = range.len() * elem;
        let mut v = Vec::with_capacity(rows * take);
        for r in 0..rows {
            let at = r * row + range.start * elem;
            v.extend_from_slice(&bytes[at..at + take]);
        }
        let t = self.upload(f, e, vec![rows, range.len()], &v)?;
        release_pages(&f.mmap, start, end);
        Ok(t)
    }
}

impl Weights {
    /// `name`'s entry and file, checked to have `shape` and to hold floats,
    /// and its element size in bytes.
    fn checked(&self, name: &str, shape: &[usize]) -> Result<(&Entry, &MappedFile, usize)> {
        let Some(e) = self.route.get(name) else {
            return Err(ModelError::MissingTensor {
                name: name.into(),
                location: self.location(),
            });
        };
        let f = &self.files[e.file];
        if e.shape != shape {
            return Err(ModelError::WrongShape {
                name: name.into(),
                expected: shape.to_vec(),
                found: e.shape.clone(),
                file: f.path.clone(),
            });
        }
        // Integer or boolean tensors would convert to floats without a word
        // (quantized checkpoints store packed integers): refuse them.
        let elem = match e.dtype {
            safetensors::Dtype::F16 | safetensors::Dtype::BF16 => 2,
            safetensors::Dtype::F32 => 4,
            safetensors::Dtype::F64 => 8,
            _ => {
                return Err(ModelError::NonFloatTensor {
                    name: name.into(),
                    dtype: format!("{:?}", e.dtype),
                    file: f.path.clone(),
                });
            }
        };
        Ok((e, f, elem))
    }

    /// `bytes` (of `e`'s dtype, `shape`) onto the device, in the compute dtype.
    fn upload(&self, f: &MappedFile, e: &Entry, shape: Vec<usize>, bytes: &[u8]) -> Result<Tensor> {
        let view = TensorView::new(e.dtype, shape, bytes).map_err(|err| corrupt(&f.path, err))?;
        Ok(view
            .load(&self.device)
            .map_err(|err| corrupt(&f.path, err))?
            .to_dtype(self.dtype)?)
    }
}

/// Drops the resident pages of `mmap[start..end]` (whole pages only).
fn release_pages(mmap: &Mmap, start: usize, end: usize) {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .unwrap_or(4096)
        .max(1);
    let first = start.div_ceil(page) * page;
    let last = end / page * page;
    if last > first {
        // SAFETY: the mapping is a read-only view of a file; MADV_DONTNEED
        // only evicts pages, which are read from the file again if touched,
        // so every byte keeps its value. No borrow of these bytes is alive
        // (the tensor above owns a copy).
        let _ = unsafe { mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, first, last - first) };
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
