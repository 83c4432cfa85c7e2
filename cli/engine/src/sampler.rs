//! Next-token sampling: greedy at temperature 0, otherwise temperature,
//! top-k and top-p (nucleus) filtering with a seeded RNG, so that a run is
//! reproducible from its `--seed`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
pub use vpod_attention::sample::argmax;

/// Sampling settings of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: u64,
    /// Keep generating past an end-of-sequence token (benchmarks with
    /// synthetic weights, whose greedy output may hit EOS at any step).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 42,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Why these values cannot be sampled with, if they cannot: a negative
    /// or non-finite temperature, `top_p` outside (0, 1].
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Temperature 0: the token is the [`argmax`] of the logits (which the
    /// engine may then take on the device, see `vpod_attention::sample`).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        // (token, logit / T), most likely first.
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        cands.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            cands.truncate(self.params.top_k);
        }
        let max = cands[0].1;
        let mut probs: Vec<f32> = cands.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= self.params.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (p, c) in probs.iter().zip(&cands) {
            if r < *p {
                return c.0;
            }
            r -= p;
        }
        cands[probs.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_refuses_what_cannot_be_sampled_with() {
        let ok = SamplingParams::default();
        assert!(ok.validate().is_ok());
        for (t, p) in [
            (-0.1, 1.0),
            (f32::NAN, 1.0),
            (f32::INFINITY, 1.0),
            (1.0, 0.0),
            (1.0, 1.5),
            (1.0, f32::NAN),
        ] {
            let bad = SamplingParams {
                temperature: t,
                top_p: p,
                ..ok
            };
            assert!(bad.validate().is_err(), "temperature {t} top_p {p}");
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 0.8,
            top_p: 1.0,
            top_k: 1,
            seed: 7,
            ..Default::default()
        };
        assert_eq!(Sampler::new(p).sample(&logits), argmax(&logits));
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 0,
            seed: 7,
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "temperature 1 should vary: {a:?}");
    }

    #[test]
    fn top_p_drops_the_tail() {
        // One token holds ~99.99 % of the mass: top_p 0.9 must always pick it.
        let mut logits = vec![0.0f32; 100];
        logits[42] = 20.0;
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 0,
            seed: 1,
            ..Default::default()
        });
        assert!((0..200).all(|_| s.sample(&logits) == 42));
    }
}
