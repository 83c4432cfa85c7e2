//! The KV layouts the kernels read and write, and the CPU twins of the
//! write kernels (`kernels/src/kv_write.cuh`): plain loops that define what
//! the kernels must produce, element for element.
//!
//! ```text
//! paged (vLLM v0.2.7), per layer:   slot = block * block_size + offset
//!   K [num_blocks, kv_heads, head_dim / x, block_size, x]    x = 16 bytes of elements
//!   V [num_blocks, kv_heads, head_dim, block_size]
//! per-slot (vAttention), per layer: row = slot * max_len + position
//!   K, V [max_seqs, max_len, kv_heads, head_dim]
//! ```

use crate::{KvCacheError, Result};

/// Block sizes the paged kernels are built for.
pub const BLOCK_SIZES: &[usize] = &[16, 32, 64, 128];

/// Geometry of vLLM's paged K/V tensors for one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Elements per 16 bytes (8 for bf16/f16, 4 for f32).
    pub x: usize,
}

impl PagedLayout {
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        elem_bytes: usize,
    ) -> Result<Self> {
        if !BLOCK_SIZES.contains(&block_size) {
            return Err(KvCacheError::Layout(format!(
                "block size {block_size} is not one of {BLOCK_SIZES:?}"
            )));
        }
        if elem_bytes == 0 || 16 % elem_bytes != 0 {
            return Err(KvCacheError::Layout(format!(
                "element size {elem_bytes} bytes does not divide 16"
            )));
        }
        let x = 16 / elem_bytes;
        if head_dim == 0 || !head_dim.is_multiple_of(x) {
            return Err(KvCacheError::Layout(format!(
                "head_dim {head_dim} is not a multiple of x = {x}"
            )));
        }
        Ok(Self {
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            x,
        })
    }

    /// `[num_blocks, kv_heads, head_dim / x, block_size, x]`
    pub fn k_shape(&self) -> [usize; 5] {
        [
            self.num_blocks,
            self.kv_heads,
            self.head_dim / self.x,
            self.block_size,
            self.x,
        ]
    }

    /// `[num_blocks, kv_heads, head_dim, block_size]`
    pub fn v_shape(&self) -> [usize; 4] {
        [self.num_blocks, self.kv_heads, self.head_dim, self.block_size]
    }

    /// Elements of one layer's K (or V) tensor.
    pub fn elems(&self) -> usize {
        self.num_blocks * self.block_size * self.kv_heads * self.head_dim
    }

    /// Flat index of (slot, head, dim) in the K tensor.
    pub fn k_index(&self, slot: usize, h: usize, d: usize) -> usize {
        let (block, offset) = (slot / self.block_size, slot % self.block_size);
        (((block * self.kv_heads + h) * (self.head_dim / self.x) + d / self.x) * self.block_size + offset)
            * self.x
            + d % self.x
    }

    /// Flat index of (slot, head, dim) in the V tensor.
    pub fn v_index(&self, slot: usize, h: usize, d: usize) -> usize {
        let (block, offset) = (slot / self.block_size, slot % self.block_size);
        ((block * self.kv_heads + h) * self.head_dim + d) * self.block_size + offset
    }

    fn check_slots(&self, slots: &[i64]) -> Result<()> {
        let limit = (self.num_blocks * self.block_size) as i64;
        match slots.iter().find(|&&s| s >= limit || s < -1) {
            Some(s) => Err(KvCacheError::Layout(format!(
                "slot {s} outside the {limit} slots of the cache"
            ))),
            None => Ok(()),
        }
    }

    /// CPU twin of `paged_write_kv`: token t's row `src[t * src_stride ..]`
    /// (`[kv_heads, head_dim]`) goes to slot `slot_mapping[t]` of `cache`
    /// (the V layout when `is_value`, else K); slot -1 skips the token.
    pub fn write<T: Copy>(
        &self,
        cache: &mut [T],
        src: &[T],
        slot_mapping: &[i64],
        src_stride: usize,
        is_value: bool,
    ) -> Result<()> {
        self.check_slots(slot_mapping)?;
        let row = self.kv_heads * self.head_dim;
        check_len("cache", cache.len(), self.elems())?;
        for (t, &slot) in slot_mapping.iter().enumerate() {
            if slot < 0 {
                continue;
            }
            let src_row = src
                .get(t * src_stride..t * src_stride + row)
                .ok_or_else(|| short("src", t))?;
            for h in 0..self.kv_heads {
                for d in 0..self.head_dim {
                    let dst = if is_value {
                        self.v_index(slot as usize, h, d)
                    } else {
                        self.k_index(slot as usize, h, d)
                    };
                    cache[dst] = src_row[h * self.head_dim + d];
                }
            }
        }
        Ok(())
    }
}

/// Geometry of one layer's per-slot K (or V) region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLayout {
    pub max_seqs: usize,
    pub max_len: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl SlotLayout {
    /// `[max_seqs, max_len, kv_heads, head_dim]`
    pub fn shape(&self) -> [usize; 4] {
        [self.max_seqs, self.max_len, self.kv_heads, self.head_dim]
    }

    /// Elements of one row (one token of one layer's K or V).
    pub fn row_elems(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The row of `position` in `slot`.
    pub fn row(&self, slot: usize, position: usize) -> usize {
        slot * self.max_len + position
    }

    /// CPU twin of `slot_write_kv`: token t's row goes to row `rows[t]`; -1 skips.
    pub fn write<T: Copy>(&self, cache: &mut [T], src: &[T], rows: &[i64], src_stride: usize) -> Result<()> {
        let n = self.row_elems();
        let limit = (self.max_seqs * self.max_len) as i64;
        if let Some(r) = rows.iter().find(|&&r| r >= limit || r < -1) {
            return Err(KvCacheError::Layout(format!(
                "row {r} outside the {limit} rows of the cache"
            )));
        }
        check_len("cache", cache.len(), limit as usize * n)?;
        for (t, &r) in rows.iter().enumerate() {
            if r < 0 {
                continue;
            }
            let src_row = src
                .get(t * src_stride..t * src_stride + n)
                .ok_or_else(|| short("src", t))?;
            cache[r as usize * n..(r as usize + 1) * n].copy_from_slice(src_row);
        }
        Ok(())
    }
}

fn check_len(what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(KvCacheError::Layout(format!(
            "{what} holds {have} elements, the layout needs {want}"
        )));
    }
    Ok(())
}

fn short(what: &str, t: usize) -> KvCacheError {
    KvCacheError::Layout(format!("{what} is too short for token {t}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_indices_are_a_bijection() {
        let l = PagedLayout::new(3, 16, 2, 16, 2).unwrap();
        assert_eq!(l.x, 8);
        assert_eq!(l.k_shape(), [3, 2, 2, 16, 8]);
        let mut seen_k = vec![false; l.elems()];
        let mut seen_v = vec![false; l.elems()];
        for slot in 0..48 {
            for h in 0..2 {
                for d in 0..16 {
                    assert!(!std::mem::replace(&mut seen_k[l.k_index(slot, h, d)], true));
                    assert!(!std::mem::replace(&mut seen_v[l.v_index(slot, h, d)], true));
                }
            }
        }
        // Consecutive dims within one x-chunk are contiguous in K (16-byte vector stores).
        assert_eq!(l.k_index(5, 1, 9), l.k_index(5, 1, 8) + 1);
    }

    #[test]
    fn writes_and_skips() {
        let l = PagedLayout::new(2, 16, 1, 4, 4).unwrap();
        let mut cache = vec![0f32; l.elems()];
        let src: Vec<f32> = (1..=8).map(|v| v as f32).collect(); // two tokens of 4
        l.write(&mut cache, &src, &[17, -1], 4, true).unwrap();
        assert_eq!(cache[l.v_index(17, 0, 2)], 3.0);
        assert_eq!(cache.iter().filter(|&&v| v != 0.0).count(), 4);
        assert!(l.write(&mut cache, &src, &[32], 4, false).is_err());
        assert!(PagedLayout::new(2, 24, 1, 4, 4).is_err());
        assert!(PagedLayout::new(2, 16, 1, 6, 4).is_err());

        let s = SlotLayout {
            max_seqs: 2,
            max_len: 3,
            kv_heads: 1,
            head_dim: 4,
        };
        let mut cache = vec![0f32; 24];
        s.write(&mut cache, &src, &[s.row(1, 2) as i64, -1], 4).unwrap();
        assert_eq!(&cache[20..24], &[1.0, 2.0, 3.0, 4.0]);
        assert!(s.write(&mut cache, &src, &[6], 4).is_err());
    }
}
