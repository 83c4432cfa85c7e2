//! Property tests of the KV managers: random admissions, growth and
//! releases. Invariants: "can" predicts success exactly; no block or page is
//! held twice; nothing leaks (after all releases the whole capacity is free).

use std::collections::HashMap;

use candle_core::{DType, Device};
use proptest::prelude::*;

use crate::{KvManager, Mapping, PagedCache, PagedLayout, SeqId, VirtualCache, VirtualConfig};

#[derive(Debug, Clone)]
enum Op {
    Admit(usize),
    Grow(usize, usize),
    Release(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            (0usize..80).prop_map(Op::Admit),
            (0usize..8, 1usize..40).prop_map(|(s, d)| Op::Grow(s, d)),
            (0usize..8).prop_map(Op::Release),
        ],
        1..120,
    )
}

/// Runs `ops` against `m`, checking after every step; returns the live sequences.
fn drive<M: KvManager>(m: &mut M, ops: &[Op], check: &dyn Fn(&M)) {
    let mut live: HashMap<SeqId, usize> = HashMap::new(); // seq -> length
    let mut next: SeqId = 0;
    for op in ops {
        match *op {
            Op::Admit(len) => {
                next += 1;
                let can = m.can_admit(len, 0);
                if live.is_empty() {
                    assert_eq!(
                        can,
                        len <= m.max_admissible(0),
                        "max_admissible disagrees with an empty cache"
                    );
                }
                assert_eq!(can, m.admit(next, len).is_ok(), "can_admit({len}) mispredicted");
                if can {
                    live.insert(next, len);
                    assert!(m.capacity(next).unwrap() >= len);
                }
            }
            Op::Grow(i, delta) => {
                let Some((&seq, &len)) = live.iter().nth(i % live.len().max(1)) else {
                    continue;
                };
                let can = m.can_grow(seq, len + delta);
                assert_eq!(can, m.grow(seq, len + delta).is_ok(), "can_grow mispredicted");
                if can {
                    live.insert(seq, len + delta);
                    assert!(m.capacity(seq).unwrap() >= len + delta);
                }
            }
            Op::Release(i) => {
                let Some(&seq) = live.keys().nth(i % live.len().max(1)) else {
                    continue;
                };
                m.release(seq);
                live.remove(&seq);
            }
        }
        assert!(m.free_tokens() <= m.total_tokens());
        check(m);
    }
    for seq in live.keys() {
        m.release(*seq);
    }
    assert_eq!(m.free_tokens(), m.total_tokens(), "capacity leaked");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn paged_manager_invariants(ops in ops(), bs in prop::sample::select(vec![16usize, 32, 64])) {
        let layout = PagedLayout::new(12, bs, 1, 8, 4).unwrap();
        let mut c = PagedCache::new(1, layout, 100, DType::F32, &Device::Cpu).unwrap();
        drive(&mut c, &ops, &|c: &PagedCache| c.check_invariants());
    }

    #[test]
    fn virtual_manager_invariants(ops in ops(), megacache in any::<bool>(), overlap in any::<bool>()) {
        let cfg = VirtualConfig {
            num_layers: 2, kv_heads: 1, head_dim: 64, elem_bytes: 4, max_seqs: 4, max_len: 100,
            page_size: 4096, budget_bytes: 10 * 4 * 4096, megacache,
            mapping: if overlap { Mapping::Overlapped } else { Mapping::Sync },
        };
        let mut c = VirtualCache::new(cfg).unwrap();
        drive(&mut c, &ops, &|c: &VirtualCache| c.check_invariants());
    }
}
