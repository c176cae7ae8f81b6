//! Full inference, the conventional order and the baseline every figure is measured against:
//! candidates sorted by length into batches, each batch through every layer, every score kept.
//! Batches are packed (no padding) so the baseline wastes no work either.

use super::stats::RequestStats;
use super::{Layers, Progress};
use crate::error::Result;
use crate::models::{PackedBatch, RerankModel};
use crate::tokenize::EncodedPair;
use std::time::Instant;

/// Candidate indices sorted longest first (ties by index), so batches hold similar lengths.
pub(crate) fn length_order(pairs: &[EncodedPair]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by(|&a, &b| pairs[b].len().cmp(&pairs[a].len()).then(a.cmp(&b)));
    order
}

/// Consecutive runs of `order` with at most `max_count` candidates and (unless a single
/// candidate is longer) at most `max_tokens` tokens, so a batch of long documents is split
/// and activation memory stays bounded as in grating mode's chunks.
pub(crate) fn plan_batches(
    pairs: &[EncodedPair],
    order: &[usize],
    max_count: usize,
    max_tokens: usize,
) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut tokens = 0;
    for &m in order {
        let len = pairs[m].len();
        match out.last_mut() {
            Some(cur) if cur.len() < max_count && tokens + len <= max_tokens => {
                cur.push(m);
                tokens += len;
            }
            _ => {
                out.push(vec![m]);
                tokens = len;
            }
        }
    }
    out
}

pub(crate) fn pack(pairs: &[EncodedPair], members: &[usize]) -> PackedBatch {
    PackedBatch::new(
        members
            .iter()
            .map(|&i| (pairs[i].ids.as_slice(), pairs[i].type_ids.as_slice())),
    )
}

/// Scores every candidate at the last layer; returns logits in candidate order.
pub(crate) fn score_all(
    model: &dyn RerankModel,
    layers: &mut Layers<'_>,
    pairs: &[EncodedPair],
    batch_size: usize,
    batch_tokens: usize,
    stats: &mut RequestStats,
    progress: Option<&dyn Progress>,
) -> Result<Vec<f32>> {
    let _span = tracing::debug_span!("full_mode", candidates = pairs.len()).entered();
    let info = model.info();
    let num_layers = info.num_layers;
    let order = length_order(pairs);
    let mut scores = vec![f32::NAN; pairs.len()];
    let batches = plan_batches(pairs, &order, batch_size.max(1), batch_tokens.max(1));
    let total_batches = batches.len();
    for (bi, members) in batches.iter().enumerate() {
        let batch = pack(pairs, members);
        let members = members.as_slice();
        let t = Instant::now();
        let mut hidden = model.embed(&batch)?;
        // With streamed weights every batch reads every layer again, as offloading runtimes do.
        layers.begin((0..num_layers).collect());
        for l in 0..num_layers {
            let (layer, stall) = layers.get(l)?;
            stats.stall_seconds += stall;
            hidden = layer.forward(&hidden, &batch)?;
        }
        layers.end();
        let s = model.score(&hidden, &batch)?;
        for (&i, v) in members.iter().zip(s) {
            scores[i] = v;
        }
        stats.compute_seconds += t.elapsed().as_secs_f64();
        if let Some(p) = progress {
            p.step(bi + 1, total_batches);
        }
    }
    stats.layers_per_candidate = vec![num_layers as u16; pairs.len()];
    stats.flops = pairs
        .iter()
        .map(|p| info.layer_flops(p.len()) * num_layers as f64)
        .sum();
    Ok(scores)
}
