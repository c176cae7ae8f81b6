//! Full inference, the conventional order and the baseline every figure is measured against:
//! candidates sorted by length into batches, each batch through every layer, every score kept.
//! Batches are packed (no padding) so the baseline wastes no work either.

use super::stats::RequestStats;
use super::Progress;
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

pub(crate) fn pack(pairs: &[EncodedPair], members: &[usize]) -> PackedBatch {
    PackedBatch::new(
        members
            .iter()
            .map(|&i| (pairs[i].ids.as_slice(), pairs[i].type_ids.as_slice())),
    )
}

/// Scores every candidate at the last layer; returns logits in candidate order.
pub fn score_all(
    model: &dyn RerankModel,
    pairs: &[EncodedPair],
    batch_size: usize,
    stats: &mut RequestStats,
    progress: Option<&dyn Progress>,
) -> Result<Vec<f32>> {
    let _span = tracing::debug_span!("full_mode", candidates = pairs.len()).entered();
    let info = model.info();
    let num_layers = info.num_layers;
    let order = length_order(pairs);
    let mut scores = vec![f32::NAN; pairs.len()];
    let batch_size = batch_size.max(1);
    let total_batches = order.len().div_ceil(batch_size);
    let layers: Vec<_> = (0..num_layers).map(|i| model.layer(i)).collect::<Result<_>>()?;
    for (bi, members) in order.chunks(batch_size).enumerate() {
        let batch = pack(pairs, members);
        let t = Instant::now();
        let mut hidden = model.embed(&batch)?;
        for layer in &layers {
            hidden = layer.forward(&hidden, &batch)?;
        }
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
