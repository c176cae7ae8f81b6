//! Full inference, the conventional order and the baseline every figure is measured against:
//! candidates sorted by length into batches, each batch through every layer, every score kept.
//! Batches are packed (no padding) so the baseline wastes no work either.

use super::batch::{length_order, pack, plan_batches};
use super::layers::LayerProvider;
use super::stats::RequestStats;
use super::Progress;
use crate::error::Result;
use crate::models::RerankModel;
use crate::tokenize::EncodedPair;
use std::time::Instant;

/// Scores every candidate at the last layer; returns logits in candidate order.
pub(crate) fn score_all(
    model: &dyn RerankModel,
    layers: &mut LayerProvider,
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
        layers.expect(&(0..num_layers).collect::<Vec<_>>());
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
