//! The model zoo: short aliases for the Hub checkpoints we serve, with their
//! exact shapes so that synthetic (random-weight) runs need no download.

use crate::LlamaConfig;

/// A named model the CLI knows by a short alias.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub alias: &'static str,
    pub repo: &'static str,
    pub note: &'static str,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub bos: u32,
    pub eos: u32,
}

/// Facts from the checkpoints' `config.json` (all head_dim 128, RMSNorm eps 1e-5, untied).
pub const PRESETS: &[Preset] = &[
    Preset {
        alias: "yi-6b",
        repo: "01-ai/Yi-6B",
        note: "32 layers, GQA 32/4",
        layers: 32,
        hidden: 4096,
        heads: 32,
        kv_heads: 4,
        ffn: 11008,
        vocab: 64000,
        rope_theta: 5e6,
        max_position_embeddings: 4096,
        bos: 1,
        eos: 2,
    },
    Preset {
        alias: "llama3-8b",
        repo: "meta-llama/Meta-Llama-3-8B",
        note: "32 layers, GQA 32/8; gated: needs HF_TOKEN",
        layers: 32,
        hidden: 4096,
        heads: 32,
        kv_heads: 8,
        ffn: 14336,
        vocab: 128256,
        rope_theta: 5e5,
        max_position_embeddings: 8192,
        bos: 128000,
        eos: 128001,
    },
    Preset {
        alias: "yi-34b",
        repo: "01-ai/Yi-34B",
        note: "60 layers, GQA 56/8",
        layers: 60,
        hidden: 7168,
        heads: 56,
        kv_heads: 8,
        ffn: 20480,
        vocab: 64000,
        rope_theta: 5e6,
        max_position_embeddings: 4096,
        bos: 1,
        eos: 2,
    },
];

/// Comma-separated preset aliases.
pub fn preset_names() -> String {
    PRESETS.iter().map(|p| p.alias).collect::<Vec<_>>().join(", ")
}

/// The preset called `alias` (case-insensitive).
pub fn preset(alias: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.alias.eq_ignore_ascii_case(alias))
}

impl Preset {
    /// The model's configuration, as its `config.json` gives it.
    pub fn config(&self) -> LlamaConfig {
        LlamaConfig {
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.ffn,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.hidden / self.heads,
            rms_norm_eps: 1e-5,
            max_position_embeddings: self.max_position_embeddings,
            rope_theta: self.rope_theta,
            rope_scaling: None,
            tie_word_embeddings: false,
            weight_dtype: Some(candle_core::DType::BF16),
            bos_token_id: Some(self.bos),
            eos_token_ids: vec![self.eos],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameter counts of the real checkpoints (and so of synthetic runs).
    #[test]
    fn preset_shapes_match_the_published_sizes() {
        let billions = |a: &str| preset(a).unwrap().config().num_parameters() as f64 / 1e9;
        assert!((billions("yi-6b") - 6.06).abs() < 0.01);
        assert!((billions("llama3-8b") - 8.03).abs() < 0.01);
        assert!((billions("yi-34b") - 34.39).abs() < 0.01);
        assert!(preset("LLAMA3-8B").is_some());
        assert_eq!(preset("llama3-8b").unwrap().config().gqa_group(), 4);
        assert_eq!(preset("yi-34b").unwrap().config().gqa_group(), 7);
    }
}
