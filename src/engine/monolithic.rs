//! Monolithic forwarding: every candidate of a request advances one layer at a time, so after
//! each layer the engine sees all live candidates' scores together and can prune.
//!
//! Hidden states live in chunks of packed sequences (no padding), formed from the length-sorted
//! live candidates under a token budget; a layer runs chunk by chunk, so activation memory is
//! bounded by one chunk whatever N is. After a pruning decision the survivors are repacked into
//! fresh chunks and the storage of pruned candidates is released.

use super::full::{length_order, pack, plan_batches};
use super::offload::{Hidden, SpillFile};
use super::stats::{LayerTiming, RequestStats};
use super::{Layers, Progress, Scored};
use crate::error::Result;
use crate::models::{PackedBatch, RerankModel};
use crate::prune::state::PruneState;
use crate::prune::PruneConfig;
use crate::tokenize::EncodedPair;
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

/// Tokens per chunk unless the request says otherwise. Sweep on the idle 2-core machine
/// (layerwise MiniLM, 100 BM25 candidates = 9667 tokens, `--prune off`, two runs each). Chunk
/// tokens: GFLOP/s, peak MiB.
/// - 1024: 105-124, 148
/// - 2048: 117-124, 168
/// - 4096: 115-128, 192
/// - 8192: 107, 247
/// - 16384: 101-111, 254
///
/// 2048-4096 keep the GEMMs fastest; 4096 is the default, and 2048 saves about 24 MiB at
/// the same speed.
pub const DEFAULT_CHUNK_TOKENS: usize = 4096;

/// Live candidates of one chunk and their hidden states `[tokens, hidden]`.
pub(crate) struct Chunk {
    pub members: Vec<usize>,
    pub batch: PackedBatch,
    pub hidden: Hidden,
}

/// Splits `members` (already in length order) into runs of at most `budget` tokens (a longer
/// candidate gets a chunk of its own).
pub(crate) fn plan_chunks(
    pairs: &[EncodedPair],
    members: &[usize],
    budget: usize,
) -> Vec<Vec<usize>> {
    plan_batches(pairs, members, usize::MAX, budget)
}

/// Gathers the rows of the live members of `chunks` into new chunks under `budget`, dropping
/// each old chunk as soon as its survivors are copied.
pub(crate) fn repack(
    chunks: Vec<Chunk>,
    live: impl Fn(usize) -> bool,
    pairs: &[EncodedPair],
    budget: usize,
    spill: Option<&SpillFile>,
    (dtype, device): (DType, &Device),
) -> Result<Vec<Chunk>> {
    // (member, old chunk, first row, len) of each survivor, in order.
    let mut pieces = Vec::new();
    for (ci, c) in chunks.iter().enumerate() {
        for (j, &m) in c.members.iter().enumerate() {
            if live(m) {
                let (s, len) = c.batch.layout.spans[j];
                pieces.push((m, ci, s, len));
            }
        }
    }
    let members: Vec<usize> = pieces.iter().map(|p| p.0).collect();
    let plan = plan_chunks(pairs, &members, budget);
    let mut old: Vec<Option<Chunk>> = chunks.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(plan.len());
    let mut next_piece = 0;
    for group in plan {
        let group_pieces = &pieces[next_piece..next_piece + group.len()];
        next_piece += group.len();
        let mut parts = Vec::new();
        let mut run_chunk = usize::MAX;
        let mut run_rows: Vec<u32> = Vec::new();
        let flush = |ci: usize, rows: &mut Vec<u32>, parts: &mut Vec<Tensor>| -> Result<()> {
            if rows.is_empty() {
                return Ok(());
            }
            let c = old[ci].as_ref().expect("chunk still present");
            let hidden = c.hidden.get(spill, dtype, device)?;
            let idx = crate::ops::upload_u32(rows, rows.len(), device)?;
            parts.push(hidden.index_select(&idx, 0)?);
            rows.clear();
            Ok(())
        };
        for &(_, ci, s, len) in group_pieces {
            if ci != run_chunk {
                if run_chunk != usize::MAX {
                    flush(run_chunk, &mut run_rows, &mut parts)?;
                }
                run_chunk = ci;
            }
            run_rows.extend(s as u32..(s + len) as u32);
        }
        flush(run_chunk, &mut run_rows, &mut parts)?;
        // Old chunks wholly consumed by now can go.
        let last_used = group_pieces.last().map(|p| p.1).unwrap_or(0);
        for slot in old.iter_mut().take(last_used) {
            *slot = None;
        }
        let hidden = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 0)?
        };
        let hidden = match spill {
            Some(s) => s.spill(&hidden)?,
            None => Hidden::Resident(hidden),
        };
        out.push(Chunk {
            batch: pack(pairs, &group),
            members: group,
            hidden,
        });
    }
    Ok(out)
}

/// What a monolithic pass does after each layer.
pub(crate) enum Observer<'a> {
    /// Prune with this state; only layers where a decision is possible are scored.
    Prune(&'a mut PruneState),
    /// Score every live candidate after every layer and keep the scores (`[layer][candidate]`).
    Record(&'a mut Vec<Vec<f32>>),
}

/// Runs all candidates layer-major. Returns the last layer's `(candidate, logit)` for the
/// candidates still live there. With `offload`, hidden states wait in a spill file between
/// layers (see [`super::offload`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    model: &dyn RerankModel,
    layers: &mut Layers<'_>,
    pairs: &[EncodedPair],
    chunk_tokens: usize,
    offload: bool,
    mut observer: Observer<'_>,
    stats: &mut RequestStats,
    progress: Option<&dyn Progress>,
) -> Result<Vec<(usize, f32)>> {
    let info = model.info().clone();
    let num_layers = info.num_layers;
    let n = pairs.len();
    let budget = chunk_tokens.max(1);
    let compute_start = Instant::now();
    let spill = if offload {
        Some(SpillFile::new()?)
    } else {
        None
    };
    let spill = spill.as_ref();

    let order = length_order(pairs);
    let mut chunks = Vec::new();
    let mut dt = (DType::F32, Device::Cpu);
    for members in plan_chunks(pairs, &order, budget) {
        let batch = pack(pairs, &members);
        let hidden = model.embed(&batch)?;
        dt = (hidden.dtype(), hidden.device().clone());
        let hidden = match spill {
            Some(s) => s.spill(&hidden)?,
            None => Hidden::Resident(hidden),
        };
        chunks.push(Chunk {
            members,
            batch,
            hidden,
        });
    }
    let (dtype, device) = (dt.0, dt.1.clone());

    let mut layers_done = vec![0u16; n];
    let mut finals = Vec::new();
    layers.begin((0..num_layers).collect());
    for l in 0..num_layers {
        let layer_no = l + 1;
        let t = Instant::now();
        let (layer, stall) = layers.get(l)?;
        stats.stall_seconds += stall;
        let is_last = layer_no == num_layers;
        let wants = match &observer {
            Observer::Prune(st) => is_last || st.wants_scores(layer_no),
            Observer::Record(_) => true,
        };
        let live_before: usize = chunks.iter().map(|c| c.members.len()).sum();
        let mut ids = Vec::with_capacity(live_before);
        let mut scores = Vec::with_capacity(live_before);
        let mut tokens = 0;
        // With offload, chunk i+1 is read back and chunk i-1 written out while chunk i computes.
        let mut next = match (spill, chunks.first()) {
            (Some(s), Some(c)) => Some(c.hidden.get(Some(s), dtype, &device)?),
            _ => None,
        };
        let mut pending_write: Option<(usize, Tensor)> = None;
        for i in 0..chunks.len() {
            let input = match next.take() {
                Some(t) => t,
                None => chunks[i].hidden.get(spill, dtype, &device)?,
            };
            let out = match spill {
                None => layer.forward(&input, &chunks[i].batch)?,
                Some(s) => {
                    let ahead = chunks.get(i + 1).map(|c| match &c.hidden {
                        Hidden::Spilled { at, rows, dim } => (*at, *rows, *dim),
                        Hidden::Resident(_) => {
                            unreachable!("offloaded chunks are spilled between steps")
                        }
                    });
                    let behind = pending_write.take();
                    let batch = &chunks[i].batch;
                    let dev = &device;
                    let (out, read, written) = std::thread::scope(|sc| {
                        let reader = ahead.map(|(at, rows, dim)| {
                            sc.spawn(move || s.load(at, rows, dim, dtype, dev))
                        });
                        let writer =
                            behind.map(|(ci, t)| sc.spawn(move || s.spill(&t).map(|h| (ci, h))));
                        let out = layer.forward(&input, batch);
                        let read = reader.map(|h| h.join().expect("prefetch thread"));
                        let written = writer.map(|h| h.join().expect("offload thread"));
                        (out, read, written)
                    });
                    if let Some(w) = written {
                        let (ci, h) = w?;
                        chunks[ci].hidden = h;
                    }
                    next = read.transpose()?;
                    out?
                }
            };
            drop(input);
            let chunk = &mut chunks[i];
            tokens += chunk.batch.num_tokens();
            for (&m, &(_, len)) in chunk.members.iter().zip(&chunk.batch.layout.spans) {
                layers_done[m] += 1;
                stats.flops += info.layer_flops(len);
            }
            if wants {
                ids.extend_from_slice(&chunk.members);
                scores.extend(model.score(&out, &chunk.batch)?);
            }
            match spill {
                Some(_) => pending_write = Some((i, out)),
                None => chunk.hidden = Hidden::Resident(out),
            }
        }
        if let (Some(s), Some((ci, t))) = (spill, pending_write.take()) {
            chunks[ci].hidden = s.spill(&t)?;
        }
        drop(layer);
        if wants {
            match &mut observer {
                Observer::Record(rec) => {
                    let mut row = vec![f32::NAN; n];
                    for (&i, &s) in ids.iter().zip(&scores) {
                        row[i] = s;
                    }
                    rec.push(row);
                }
                Observer::Prune(st) if !is_last => {
                    if st.observe(layer_no, &ids, &scores) {
                        let st: &PruneState = st;
                        chunks = repack(
                            chunks,
                            |m| st.is_live(m),
                            pairs,
                            budget,
                            spill,
                            (dtype, &device),
                        )?;
                    }
                }
                Observer::Prune(_) => {}
            }
            if is_last {
                finals = ids.into_iter().zip(scores).collect();
            }
        }
        stats.layer_timings.push(LayerTiming {
            layer: layer_no,
            live_candidates: live_before,
            tokens,
            seconds: t.elapsed().as_secs_f64(),
            stall_seconds: stall,
        });
        if let Some(p) = progress {
            p.step(layer_no, num_layers);
        }
        if chunks.is_empty() {
            break;
        }
    }
    layers.end();
    if let Some(s) = spill {
        stats.offloaded_bytes = s.bytes_written.load(std::sync::atomic::Ordering::Relaxed);
    }
    stats.compute_seconds += compute_start.elapsed().as_secs_f64();
    stats.layers_per_candidate = layers_done;
    Ok(finals)
}

/// Runs the request layer-major with pruning and returns its top `k`, best first.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    model: &dyn RerankModel,
    layers: &mut Layers<'_>,
    pairs: &[EncodedPair],
    k: usize,
    chunk_tokens: usize,
    offload: bool,
    prune: &PruneConfig,
    stats: &mut RequestStats,
    progress: Option<&dyn Progress>,
) -> Result<Vec<Scored>> {
    let _span = tracing::debug_span!("monolithic", candidates = pairs.len(), k).entered();
    let mut state = PruneState::new(prune, pairs.len(), k, model.info().num_layers);
    let finals = forward(
        model,
        layers,
        pairs,
        chunk_tokens,
        offload,
        Observer::Prune(&mut state),
        stats,
        progress,
    )?;
    stats.prune_events = state.events().to_vec();
    Ok(state
        .ranking(&finals)
        .into_iter()
        .map(|(index, logit)| Scored { index, logit })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(len: usize) -> EncodedPair {
        EncodedPair {
            ids: vec![1; len],
            type_ids: vec![0; len],
            truncated: false,
        }
    }

    #[test]
    fn chunks_respect_the_token_budget() {
        let pairs: Vec<EncodedPair> = [5, 9, 3, 20, 4].iter().map(|&l| pair(l)).collect();
        let order = length_order(&pairs);
        assert_eq!(order, vec![3, 1, 0, 4, 2]);
        let plan = plan_chunks(&pairs, &order, 12);
        assert_eq!(plan, vec![vec![3], vec![1], vec![0, 4, 2]]);
        for c in &plan {
            let t: usize = c.iter().map(|&m| pairs[m].len()).sum();
            assert!(t <= 12 || c.len() == 1);
        }
    }

    #[test]
    fn repack_keeps_survivor_rows_and_releases_the_rest() {
        let pairs: Vec<EncodedPair> = [2, 3, 1, 2].iter().map(|&l| pair(l)).collect();
        let dev = candle_core::Device::Cpu;
        // Two chunks: members [1, 0] (rows 0-4) and [3, 2] (rows 0-2); row values encode
        // (member * 10 + row within member).
        let mk = |members: Vec<usize>| {
            let mut rows = vec![];
            for &m in &members {
                for r in 0..pairs[m].len() {
                    rows.push((m * 10 + r) as f32);
                }
            }
            let t = Tensor::from_vec(rows.clone(), (rows.len(), 1), &dev).unwrap();
            Chunk {
                batch: pack(&pairs, &members),
                members,
                hidden: Hidden::Resident(t),
            }
        };
        let chunks = vec![mk(vec![1, 0]), mk(vec![3, 2])];
        let out = repack(chunks, |m| m != 0, &pairs, 100, None, (DType::F32, &dev)).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].members, vec![1, 3, 2]);
        let h = out[0].hidden.get(None, DType::F32, &dev).unwrap();
        let v: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![10.0, 11.0, 12.0, 30.0, 31.0, 20.0]);
        assert_eq!(out[0].batch.layout.spans, vec![(0, 3), (3, 2), (5, 1)]);
    }
}
