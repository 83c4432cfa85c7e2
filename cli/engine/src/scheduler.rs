//! Which tokens run in the next step.
//!
//! - `prefill-first` (vLLM v0.2.7): a step is all prefills (whole prompts,
//!   FCFS, while they fit) or, when no waiting request can start, all decodes.
//! - `hybrid` (Sarathi-Serve): a per-step token budget (`chunk_size`); every
//!   running decode first (one token each), then prefill chunks
//!   `min(remaining prompt, budget left)` from partly prefilled sequences and
//!   then from the waiting queue (FCFS). Optionally at most one prefill chunk
//!   per step, as in the POD-Attention paper.
//!
//! Admission: FCFS, when the whole prompt fits in the KV cache with a 1 %
//! reserve and fewer than `max_seqs` sequences run. When a running sequence
//! cannot grow, the newest running sequence is preempted by recompute: its
//! KV is freed and it goes back to the front of the queue, to be prefilled
//! again (prompt and the tokens generated so far).

use std::collections::VecDeque;

use vpod_attention::{KvManager, SeqChunk, SeqId};

/// Scheduling policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    PrefillFirst,
    Hybrid { one_prefill: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub policy: Policy,
    /// Token budget of a step (hybrid) / most prefill tokens of a step (prefill-first).
    pub chunk_size: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Hybrid { one_prefill: false },
            chunk_size: 512,
            max_seqs: 8,
        }
    }
}

/// What the scheduler knows of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqState {
    pub id: SeqId,
    /// Prompt plus generated tokens.
    pub len: usize,
    /// Tokens whose KV is in the cache.
    pub computed: usize,
}

/// One step's plan: chunks in packed order; a chunk ending at its
/// sequence's `len` produces that sequence's next token.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub chunks: Vec<SeqChunk>,
    pub preempted: Vec<SeqId>,
}

impl Plan {
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.query_len).sum()
    }
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    /// FCFS queue (preempted sequences go back to the front).
    pub waiting: VecDeque<SeqState>,
    /// Admitted, in admission order (the newest last).
    pub running: Vec<SeqState>,
}

/// Tokens the 1 % reserve keeps free.
fn reserve(kv: &dyn KvManager) -> usize {
    kv.total_tokens() / 100
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn add(&mut self, s: SeqState) {
        self.waiting.push_back(s);
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Drops a finished sequence (the caller frees its KV).
    pub fn finish(&mut self, id: SeqId) {
        self.running.retain(|s| s.id != id);
    }

    /// Drops a sequence wherever it is, waiting or running (the caller frees
    /// its KV). Returns whether it was there.
    pub fn abort(&mut self, id: SeqId) -> bool {
        let before = self.waiting.len() + self.running.len();
        self.waiting.retain(|s| s.id != id);
        self.running.retain(|s| s.id != id);
        self.waiting.len() + self.running.len() < before
    }

    /// Records that a step computed `n` tokens of `id` and, if it produced
    /// a token, that the sequence grew by one.
    pub fn advance(&mut self, id: SeqId, n: usize, produced: bool) {
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            s.computed += n;
            if produced {
                s.len += 1;
            }
        }
    }

    /// Plans the next step. `kv` is the backend's cache (`None`: unbounded).
    pub fn schedule(&mut self, mut kv: Option<&mut dyn KvManager>) -> Plan {
        let mut plan = Plan::default();
        match self.cfg.policy {
            Policy::PrefillFirst => {
                self.add_prefills(&mut kv, &mut plan, self.cfg.chunk_size, false, true);
                if plan.chunks.is_empty() {
                    self.add_decodes(&mut kv, &mut plan);
                }
            }
            Policy::Hybrid { one_prefill } => {
                self.add_decodes(&mut kv, &mut plan);
                let budget = self.cfg.chunk_size.saturating_sub(plan.num_tokens());
                self.add_prefills(&mut kv, &mut plan, budget, one_prefill, false);
            }
        }
        plan
    }

    /// Every running sequence past its prefill feeds its last token. A
    /// sequence that cannot grow preempts the newest running ones (itself,
    /// if it is the newest).
    fn add_decodes(&mut self, kv: &mut Option<&mut dyn KvManager>, plan: &mut Plan) {
        let mut i = 0;
        while i < self.running.len() {
            let (id, len, computed) = (self.running[i].id, self.running[i].len, self.running[i].computed);
            if len - computed != 1 {
                i += 1; // still prefilling
                continue;
            }
            if let Some(kv) = kv.as_deref_mut() {
                while !kv.can_grow(id, len) {
                    let Some(victim) = self.running.pop() else { break };
                    kv.release(victim.id);
                    plan.chunks.retain(|c| c.seq_id != victim.id);
                    plan.preempted.push(victim.id);
                    let gone = victim.id == id;
                    self.waiting.push_front(SeqState {
                        computed: 0,
                        ..victim
                    });
                    if gone {
                        break;
                    }
                }
                if !self.running.iter().any(|r| r.id == id) || kv.grow(id, len).is_err() {
                    break; // it was the newest: nothing after it is left
                }
            }
            plan.chunks.push(SeqChunk {
                seq_id: id,
                context_len: computed,
                query_len: 1,
            });
            i += 1;
        }
    }

    /// Prefill chunks within `budget` tokens: sequences already prefilling,
    /// then FCFS admissions. `whole`: whole prompts only (prefill-first),
    /// `budget` then caps the step's prefill tokens (the first always runs).
    fn add_prefills(
        &mut self,
        kv: &mut Option<&mut dyn KvManager>,
        plan: &mut Plan,
        mut budget: usize,
        one: bool,
        whole: bool,
    ) {
        let mut count = 0;
        for s in &self.running {
            if budget == 0 || (one && count == 1) {
                return;
            }
            let rem = s.len - s.computed;
            if rem <= 1 || plan.chunks.iter().any(|c| c.seq_id == s.id) {
                continue;
            }
            let n = if whole { rem } else { rem.min(budget) };
            plan.chunks.push(SeqChunk {
                seq_id: s.id,
                context_len: s.computed,
                query_len: n,
            });
            budget = budget.saturating_sub(n);
            count += 1;
        }
        while budget > 0 && !(one && count == 1) && self.running.len() < self.cfg.max_seqs {
            let Some(s) = self.waiting.front().cloned() else {
                break;
            };
            let rem = s.len - s.computed;
            if whole && count > 0 && rem > budget {
                break;
            }
            if let Some(kv) = kv.as_deref_mut()
                && (!kv.can_admit(s.len, reserve(kv)) || kv.admit(s.id, s.len).is_err())
            {
                break; // FCFS: nobody overtakes the head of the queue
            }
            self.waiting.pop_front();
            let n = if whole { rem } else { rem.min(budget) };
            plan.chunks.push(SeqChunk {
                seq_id: s.id,
                context_len: s.computed,
                query_len: n,
            });
            budget = budget.saturating_sub(n);
            count += 1;
            self.running.push(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device};
    use proptest::prelude::*;
    use vpod_kvcache::{PagedCache, PagedLayout, VirtualCache, VirtualConfig};

    use super::*;

    /// Drives the scheduler without a model: every step "computes" its plan
    /// and each request stops after its own number of generated tokens.
    fn simulate(kv: &mut dyn KvManager, cfg: SchedulerConfig, reqs: &[(usize, usize)], arrivals: &[usize]) {
        let mut s = Scheduler::new(cfg);
        let mut target: HashMap<SeqId, usize> = HashMap::new();
        let mut done = 0;
        let mut step = 0;
        let mut next = 0;
        while done < reqs.len() {
            // Requests arrive over the first steps.
            while next < reqs.len() && arrivals[next] <= step {
                let (prompt, new_tokens) = reqs[next];
                s.add(SeqState {
                    id: next as SeqId,
                    len: prompt,
                    computed: 0,
                });
                target.insert(next as SeqId, prompt + new_tokens);
                next += 1;
            }
            step += 1;
            assert!(step < 100_000, "no progress");
            let plan = s.schedule(Some(kv));
            if let Policy::Hybrid { one_prefill } = cfg.policy {
                assert!(
                    plan.num_tokens() <= cfg.chunk_size.max(1),
                    "token budget exceeded"
                );
                if one_prefill {
                    assert!(
                        plan.chunks
                            .iter()
                            .filter(|c| c.query_len > 1 || c.context_len == 0)
                            .count()
                            <= 1
                    );
                }
            }
            assert!(s.running.len() <= cfg.max_seqs);
            let mut seen = std::collections::HashSet::new();
            for c in &plan.chunks {
                assert!(seen.insert(c.seq_id), "sequence scheduled twice");
                assert!(
                    kv.capacity(c.seq_id).unwrap() >= c.context_len + c.query_len,
                    "no room for the chunk"
                );
            }
            for c in plan.chunks {
                let st = s.running.iter().find(|r| r.id == c.seq_id).unwrap().clone();
                let produced = c.context_len + c.query_len == st.len;
                if produced && st.len + 1 > target[&c.seq_id] {
                    s.finish(c.seq_id);
                    kv.release(c.seq_id);
                    done += 1;
                } else {
                    s.advance(c.seq_id, c.query_len, produced);
                }
            }
        }
        assert!(s.is_idle());
        assert_eq!(kv.free_tokens(), kv.total_tokens(), "KV leaked");
    }

    fn workload() -> impl Strategy<Value = (Vec<(usize, usize)>, Vec<usize>)> {
        prop::collection::vec((1usize..60, 1usize..30), 1..25).prop_flat_map(|reqs| {
            let n = reqs.len();
            (
                Just(reqs),
                prop::collection::vec(0usize..20, n).prop_map(|mut a| {
                    a.sort_unstable();
                    a
                }),
            )
        })
    }

    fn policy() -> impl Strategy<Value = SchedulerConfig> {
        (
            prop_oneof![
                Just(Policy::PrefillFirst),
                any::<bool>().prop_map(|one_prefill| Policy::Hybrid { one_prefill })
            ],
            8usize..96,
            1usize..6,
        )
            .prop_map(|(policy, chunk_size, max_seqs)| SchedulerConfig {
                policy,
                chunk_size,
                max_seqs,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Every request completes under both caches, whatever the arrivals,
        /// lengths and budgets (tight enough to preempt).
        #[test]
        fn every_request_completes(w in workload(), cfg in policy(), blocks in 6usize..20) {
            let (reqs, arrivals) = w;
            let layout = PagedLayout::new(blocks, 16, 1, 8, 4).unwrap();
            let mut paged = PagedCache::new(1, layout, 96, DType::F32, &Device::Cpu).unwrap();
            simulate(&mut paged, cfg, &reqs, &arrivals);
            let mut virt = VirtualCache::new(VirtualConfig {
                num_layers: 1, kv_heads: 1, head_dim: 64, elem_bytes: 4, max_seqs: 6, max_len: 96,
                page_size: 4096, budget_bytes: blocks * 2 * 4096, megacache: false,
                mapping: vpod_kvcache::Mapping::Overlapped,
            }).unwrap();
            simulate(&mut virt, cfg, &reqs, &arrivals);
        }
    }
}
