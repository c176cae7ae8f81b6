//! Turning (query, document) pairs into token ids: the tokenizer's own pair template for
//! encoders, the published Qwen3-Reranker prompt for Qwen3. The query is tokenized once per
//! request, documents in parallel; documents are truncated before queries are.

use crate::error::{GratingError, Result};
use std::path::Path;
use tokenizers::{Encoding, Tokenizer, TruncationDirection};

pub use crate::HARD_MAX_TOKENS;

/// How a (query, document) pair becomes one sequence. Chosen by the caller from the model's
/// architecture, so tokenization knows nothing of model files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptTemplate {
    /// The tokenizer's own pair template (`[CLS] q [SEP] d [SEP]` and the like): encoders.
    Pair,
    /// The published Qwen3-Reranker chat prompt.
    Qwen3Reranker,
}

/// Documents longer than this many bytes are cut before tokenization: a 512-token model never
/// reads that far, and tokenizing megabytes of text only to drop it wastes seconds.
const MAX_DOC_BYTES_PER_TOKEN: usize = 32;

pub const QWEN3_SYSTEM_PREFIX: &str = "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n";
pub const QWEN3_ASSISTANT_SUFFIX: &str =
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
pub const QWEN3_DEFAULT_INSTRUCTION: &str =
    "Given a web search query, retrieve relevant passages that answer the query";

/// Which end of a document is cut when it does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the beginning (the usual choice).
    #[default]
    Right,
    /// Keep the end.
    Left,
}

/// Token ids of one (query, document) sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Whether the document (or query) was cut to fit.
    pub truncated: bool,
}

impl EncodedPair {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

enum Format {
    /// `[CLS] q [SEP] d [SEP]`-style, from the tokenizer's post-processor.
    Pair,
    /// The Qwen3-Reranker chat prompt.
    Qwen3 { prefix: Vec<u32>, suffix: Vec<u32> },
}

/// Per-request encoding choices.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub max_length: usize,
    pub truncation: Truncation,
    /// Qwen3 only: the `<Instruct>` line.
    pub instruction: Option<String>,
    /// If false, an over-long pair is an error instead of being truncated.
    pub truncate: bool,
}

pub struct PairEncoder {
    tokenizer: Tokenizer,
    format: Format,
    pub yes_no_ids: Option<(u32, u32)>,
}

fn tok_err(e: impl std::fmt::Display) -> GratingError {
    GratingError::Tokenizer(e.to_string())
}

impl PairEncoder {
    pub fn from_file(path: &Path, template: PromptTemplate) -> Result<PairEncoder> {
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|e| GratingError::Tokenizer(format!("{}: {e}", path.display())))?;
        // Sequences are packed without padding, and truncation is ours to control.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(tok_err)?;
        let yes_no_ids = match (tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")) {
            (Some(y), Some(n)) => Some((y, n)),
            _ => None,
        };
        let format = match template {
            PromptTemplate::Qwen3Reranker => {
                let enc = |s: &str| -> Result<Vec<u32>> {
                    Ok(tokenizer
                        .encode(s, false)
                        .map_err(tok_err)?
                        .get_ids()
                        .to_vec())
                };
                Format::Qwen3 {
                    prefix: enc(QWEN3_SYSTEM_PREFIX)?,
                    suffix: enc(QWEN3_ASSISTANT_SUFFIX)?,
                }
            }
            PromptTemplate::Pair => Format::Pair,
        };
        Ok(PairEncoder {
            tokenizer,
            format,
            yes_no_ids,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokens the template adds around the texts.
    pub fn template_tokens(&self) -> usize {
        match &self.format {
            Format::Pair => self.tokenizer.get_post_processor().map_or(0, |p| {
                use tokenizers::PostProcessor;
                p.added_tokens(true)
            }),
            Format::Qwen3 { prefix, suffix } => prefix.len() + suffix.len(),
        }
    }

    /// Encodes `query` against each of `docs`.
    pub fn encode(
        &self,
        query: &str,
        docs: &[&str],
        opts: &EncodeOptions,
    ) -> Result<Vec<EncodedPair>> {
        if query.trim().is_empty() {
            return Err(GratingError::InvalidInput("the query is empty".into()));
        }
        if docs.is_empty() {
            return Err(GratingError::InvalidInput(
                "the document list is empty".into(),
            ));
        }
        let max_length = opts.max_length.min(HARD_MAX_TOKENS);
        if max_length <= self.template_tokens() + 1 {
            return Err(GratingError::InvalidInput(format!(
                "max length {max_length} leaves no room for text after the {} template tokens",
                self.template_tokens()
            )));
        }
        let byte_cap = max_length * MAX_DOC_BYTES_PER_TOKEN;
        let capped: Vec<&str> = docs
            .iter()
            .map(|d| cap_bytes(d, byte_cap, opts.truncation))
            .collect();
        match &self.format {
            Format::Pair => self.encode_pairs(query, &capped, max_length, opts, docs),
            Format::Qwen3 { prefix, suffix } => {
                self.encode_qwen3(query, &capped, max_length, opts, prefix, suffix, docs)
            }
        }
    }

    fn encode_pairs(
        &self,
        query: &str,
        docs: &[&str],
        max_length: usize,
        opts: &EncodeOptions,
        originals: &[&str],
    ) -> Result<Vec<EncodedPair>> {
        let q = self.tokenizer.encode(query, false).map_err(tok_err)?;
        let ds = self
            .tokenizer
            .encode_batch(docs.to_vec(), false)
            .map_err(tok_err)?;
        let specials = self.template_tokens();
        let text_budget = max_length - specials;
        ds.into_iter()
            .enumerate()
            .map(|(i, mut d)| {
                let mut q = q.clone();
                let byte_cut = docs[i].len() < originals[i].len();
                let over = q.len() + d.len() > text_budget || byte_cut;
                if over && !opts.truncate {
                    return Err(GratingError::LimitExceeded(format!(
                        "document {i} is {} tokens with the query, over the maximum of {max_length} (truncation is off)",
                        q.len() + d.len() + specials
                    )));
                }
                if q.len() + d.len() > text_budget {
                    // Documents are cut first; a query longer than half the budget is cut too.
                    let q_keep = q.len().min(text_budget.saturating_sub(d.len()).max(text_budget / 2));
                    if q_keep < q.len() {
                        q.truncate(q_keep, 0, TruncationDirection::Right);
                    }
                    let d_keep = text_budget - q.len();
                    d.truncate(d_keep, 0, direction(opts.truncation));
                }
                let pair = self
                    .tokenizer
                    .post_process(q, Some(d), true)
                    .map_err(tok_err)?;
                Ok(EncodedPair {
                    ids: pair.get_ids().to_vec(),
                    type_ids: pair.get_type_ids().to_vec(),
                    truncated: over,
                })
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn encode_qwen3(
        &self,
        query: &str,
        docs: &[&str],
        max_length: usize,
        opts: &EncodeOptions,
        prefix: &[u32],
        suffix: &[u32],
        originals: &[&str],
    ) -> Result<Vec<EncodedPair>> {
        let instruction = opts
            .instruction
            .as_deref()
            .unwrap_or(QWEN3_DEFAULT_INSTRUCTION);
        let middles: Vec<String> = docs
            .iter()
            .map(|d| format!("<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {d}"))
            .collect();
        let encs: Vec<Encoding> = self
            .tokenizer
            .encode_batch(middles, false)
            .map_err(tok_err)?;
        let budget = max_length - prefix.len() - suffix.len();
        encs.into_iter()
            .enumerate()
            .map(|(i, e)| {
                let mut ids = e.get_ids().to_vec();
                let byte_cut = docs[i].len() < originals[i].len();
                let over = ids.len() > budget || byte_cut;
                if over && !opts.truncate {
                    return Err(GratingError::LimitExceeded(format!(
                        "document {i} is {} tokens in the prompt, over the maximum of {max_length} (truncation is off)",
                        ids.len() + prefix.len() + suffix.len()
                    )));
                }
                // The document is the end of the middle part, so cutting the end cuts it first,
                // as the published reference does.
                ids.truncate(budget);
                let mut all = Vec::with_capacity(prefix.len() + ids.len() + suffix.len());
                all.extend_from_slice(prefix);
                all.extend_from_slice(&ids);
                all.extend_from_slice(suffix);
                Ok(EncodedPair {
                    type_ids: Vec::new(),
                    ids: all,
                    truncated: over,
                })
            })
            .collect()
    }
}

fn direction(t: Truncation) -> TruncationDirection {
    match t {
        Truncation::Right => TruncationDirection::Right,
        Truncation::Left => TruncationDirection::Left,
    }
}

/// At most `cap` bytes of `s`, cut on a char boundary at the end that truncation drops.
fn cap_bytes(s: &str, cap: usize, t: Truncation) -> &str {
    if s.len() <= cap {
        return s;
    }
    match t {
        Truncation::Right => {
            let mut end = cap;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            &s[..end]
        }
        Truncation::Left => {
            let mut start = s.len() - cap;
            while !s.is_char_boundary(start) {
                start += 1;
            }
            &s[start..]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_bytes_respects_char_boundaries() {
        let s = "ééééé"; // 2 bytes each
        assert_eq!(cap_bytes(s, 3, Truncation::Right), "é");
        assert_eq!(cap_bytes(s, 3, Truncation::Left), "é");
        assert_eq!(cap_bytes(s, 100, Truncation::Right), s);
    }
}
