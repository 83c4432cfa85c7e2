//! The CPU twin of our attention kernels: FlashAttention's online softmax in
//! f32, over K/V rows that a backend reads from its own cache layout.
//!
//! Keys are visited in tiles of `tile` positions (a paged block, a kernel's
//! key tile) within `splits` independent partitions (split-KV,
//! "flash-decoding"); each partition keeps a running max `m`, a running sum
//! `l` and an unnormalised output `acc`, and the partitions are merged at the
//! end with their log-sum-exp weights, exactly as the split kernels and
//! their combine step do:
//!
//! ```text
//! tile:     m' = max(m, max_j s_j)   acc = acc * e^(m - m') + sum_j e^(s_j - m') v_j   l likewise
//! combine:  M = max_p m_p            out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p
//! ```

use half::{bf16, f16};

/// A storage element the twins read and write.
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Reads one sequence's cached keys and values as f32.
pub trait KvRows {
    /// `out[..head_dim]` = K of `kv_head` at `position`.
    fn key(&self, position: usize, kv_head: usize, out: &mut [f32]);
    /// `out[..head_dim]` = V of `kv_head` at `position`.
    fn value(&self, position: usize, kv_head: usize, out: &mut [f32]);
}

/// How the kernel being modelled walks the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// Keys per tile.
    pub tile: usize,
    /// Key partitions merged at the end (1 = no split).
    pub splits: usize,
}

/// Causal attention of one sequence, f32. `q: [query_len, heads, head_dim]`,
/// query `i` at position `context_len + i` sees keys `0..=context_len + i`;
/// head `h` reads KV head `h / (heads / kv_heads)`. Writes `out` in the same
/// layout as `q`. Long chunks are split by query rows over the machine's
/// cores (each row's arithmetic is the same whatever the split, so the
/// result is too): the GPU tests compare 16K-token prefills against this.
#[allow(clippy::too_many_arguments)]
pub fn attend<R: KvRows + Sync>(
    q: &[f32],
    rows: &R,
    context_len: usize,
    query_len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    tiling: Tiling,
    out: &mut [f32],
) {
    let row = heads * head_dim;
    // Enough rows per thread that spawning is noise next to the work.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(query_len / 16)
        .max(1);
    let per = query_len.div_ceil(threads);
    let rows_of = |first: usize, out: &mut [f32]| {
        let n = out.len() / row;
        let q = &q[first * row..(first + n) * row];
        attend_serial(
            q,
            rows,
            context_len + first,
            n,
            heads,
            kv_heads,
            head_dim,
            scale,
            tiling,
            out,
        )
    };
    if threads == 1 {
        return rows_of(0, &mut out[..query_len * row]);
    }
    std::thread::scope(|scope| {
        for (t, chunk) in out[..query_len * row].chunks_mut(per * row).enumerate() {
            scope.spawn(move || rows_of(t * per, chunk));
        }
    });
}

/// [`attend`] on the calling thread: query `i` sits at position
/// `context_len + i` (a part of a chunk passes its first row's position).
#[allow(clippy::too_many_arguments)]
fn attend_serial<R: KvRows>(
    q: &[f32],
    rows: &R,
    context_len: usize,
    query_len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    tiling: Tiling,
    out: &mut [f32],
) {
    let group = heads / kv_heads;
    let (mut k, mut v) = (vec![0f32; head_dim], vec![0f32; head_dim]);
    let splits = tiling.splits.max(1);
    let tile = tiling.tile.max(1);
    // Per split: (m, l, acc[head_dim]).
    let mut parts: Vec<(f32, f32, Vec<f32>)> = vec![(f32::NEG_INFINITY, 0.0, vec![0.0; head_dim]); splits];
    for i in 0..query_len {
        let visible = context_len + i + 1;
        // Partition boundaries are tile-aligned, as a kernel's split sizes are.
        let tiles = visible.div_ceil(tile);
        let tiles_per_split = tiles.div_ceil(splits);
        for h in 0..heads {
            let kvh = h / group;
            let qh = &q[(i * heads + h) * head_dim..][..head_dim];
            for (p, part) in parts.iter_mut().enumerate() {
                *part = (f32::NEG_INFINITY, 0.0, vec![0.0; head_dim]);
                let start = p * tiles_per_split * tile;
                let end = ((p + 1) * tiles_per_split * tile).min(visible);
                let mut t0 = start;
                while t0 < end {
                    let t1 = (t0 + tile).min(end);
                    // Scores of this tile, then one rescale of the running state.
                    let mut scores = Vec::with_capacity(t1 - t0);
                    for pos in t0..t1 {
                        rows.key(pos, kvh, &mut k);
                        scores.push(qh.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>() * scale);
                    }
                    let m_new = scores.iter().copied().fold(part.0, f32::max);
                    let alpha = (part.0 - m_new).exp();
                    part.1 *= alpha;
                    part.2.iter_mut().for_each(|a| *a *= alpha);
                    for (pos, s) in (t0..t1).zip(&scores) {
                        let p = (s - m_new).exp();
                        part.1 += p;
                        rows.value(pos, kvh, &mut v);
                        part.2.iter_mut().zip(&v).for_each(|(a, b)| *a += p * b);
                    }
                    part.0 = m_new;
                    t0 = t1;
                }
            }
            // Combine: weights e^(m_p - M); empty partitions (m = -inf) weigh 0.
            let big_m = parts.iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out[(i * heads + h) * head_dim..][..head_dim];
            o.iter_mut().for_each(|x| *x = 0.0);
            let mut l = 0.0;
            for part in &parts {
                if part.0 == f32::NEG_INFINITY {
                    continue;
                }
                let w = (part.0 - big_m).exp();
                l += w * part.1;
                o.iter_mut().zip(&part.2).for_each(|(x, a)| *x += w * a);
            }
            o.iter_mut().for_each(|x| *x /= l);
        }
    }
}

/// [`attend`] for the packed rows `start..start + query_len` of `q` (in the
/// storage type `T`), written to the same rows of `out`: the per-sequence
/// step every CPU twin takes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_rows<T: Elem, R: KvRows + Sync>(
    q: &[T],
    out: &mut [T],
    start: usize,
    rows: &R,
    context_len: usize,
    query_len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    tiling: Tiling,
) {
    let row = heads * head_dim;
    let range = start * row..(start + query_len) * row;
    let qf: Vec<f32> = q[range.clone()].iter().map(|x| x.to_f32()).collect();
    let mut o = vec![0f32; query_len * row];
    attend(
        &qf,
        rows,
        context_len,
        query_len,
        heads,
        kv_heads,
        head_dim,
        scale,
        tiling,
        &mut o,
    );
    for (dst, x) in out[range].iter_mut().zip(o) {
        *dst = T::from_f32(x);
    }
}

/// The elements of a CPU storage that a (contiguous) layout covers.
pub(crate) fn covered<'a, T>(v: &'a [T], l: &candle_core::Layout) -> &'a [T] {
    &v[l.start_offset()..l.start_offset() + l.shape().elem_count()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// K/V held as plain `[seq_len, kv_heads, head_dim]` vectors.
    struct Dense {
        k: Vec<f32>,
        v: Vec<f32>,
        kv_heads: usize,
        d: usize,
    }

    impl KvRows for Dense {
        fn key(&self, p: usize, h: usize, out: &mut [f32]) {
            out.copy_from_slice(&self.k[(p * self.kv_heads + h) * self.d..][..self.d]);
        }
        fn value(&self, p: usize, h: usize, out: &mut [f32]) {
            out.copy_from_slice(&self.v[(p * self.kv_heads + h) * self.d..][..self.d]);
        }
    }

    /// Every tiling computes the same softmax(q k^T) v.
    #[test]
    fn tilings_agree() {
        let (ctx, ql, heads, kvh, d) = (37, 5, 4, 2, 8);
        let n = ctx + ql;
        let fill = |seed: u32, len: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let rows = Dense {
            k: fill(1, n * kvh * d),
            v: fill(2, n * kvh * d),
            kv_heads: kvh,
            d,
        };
        let q = fill(3, ql * heads * d);
        let run = |t: Tiling| {
            let mut out = vec![0f32; ql * heads * d];
            attend(&q, &rows, ctx, ql, heads, kvh, d, 0.35, t, &mut out);
            out
        };
        let base = run(Tiling { tile: 1, splits: 1 });
        for t in [
            Tiling { tile: 16, splits: 1 },
            Tiling { tile: 7, splits: 3 },
            Tiling { tile: 64, splits: 8 },
        ] {
            let o = run(t);
            let diff = base
                .iter()
                .zip(&o)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{t:?}: {diff}");
        }
    }
}
