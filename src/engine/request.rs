//! One request's way through the model, as a state machine: its candidates are embedded into
//! chunks, then each layer runs over its chunks (all at once, or a few at a time when a
//! scheduler shares the layer with other requests), and when a layer is complete its live
//! candidates are scored, the pruning rule decides, and the survivors are repacked.
//!
//! The single-request loop ([`super::single`]) and the server's shared pass
//! ([`super::scheduler`]) both drive this one type, so a request served in the shared pass
//! takes exactly the decisions, on exactly the numbers, of the same request alone.

use super::batch::{length_order, pack, plan_chunks, repack, Chunk};
use super::offload::{Hidden, SpillFile};
use super::stats::{LayerTiming, RequestStats};
use super::{RerankOutput, Scored};
use crate::error::{GratingError, Result};
use crate::models::{LayerBlock, ModelInfo, RerankModel};
use crate::prune::state::PruneState;
use crate::prune::PruneConfig;
use crate::tokenize::EncodedPair;
use candle_core::{DType, Device, Tensor};
use std::collections::VecDeque;
use std::path::Path;
use std::time::Instant;

/// What a request does with the scores after a layer.
pub(crate) enum Observer {
    /// Prune with this state; only layers where a decision is possible are scored.
    Prune(PruneState),
    /// Score every live candidate after every layer and keep the scores
    /// (`[layer][candidate]`, NaN where a candidate was not live): what calibration replays.
    Record(Vec<Vec<f32>>),
}

/// How a request's hidden states are held.
pub(crate) struct ChunkPolicy<'a> {
    /// Tokens per chunk (a longer candidate gets a chunk of its own).
    pub chunk_tokens: usize,
    /// Offload hidden states of chunks not being computed to a scratch file in this
    /// directory (the system's temporary directory when the inner value is `None`).
    pub offload: Option<Option<&'a Path>>,
}

/// A request in flight.
pub(crate) struct RequestRun {
    pairs: Vec<EncodedPair>,
    info: ModelInfo,
    chunk_tokens: usize,
    observer: Observer,
    /// Member lists of the chunks still to embed, in order.
    to_embed: VecDeque<Vec<usize>>,
    chunks: Vec<Chunk>,
    spill: Option<SpillFile>,
    /// Dtype and device of the hidden states (known once the first chunk is embedded).
    placement: (DType, Device),
    /// The 0-based layer its next chunks run, and the first of its chunks still to run there.
    layer: usize,
    next_chunk: usize,
    /// Scores taken as offloaded chunks were computed (before they went back to disk).
    early_scores: Vec<(usize, f32)>,
    layers_done: Vec<u16>,
    /// Token-layers computed so far.
    attained: u64,
    layer_tokens: usize,
    layer_seconds: f64,
    finals: Vec<(usize, f32)>,
    done: bool,
    stats: RequestStats,
}

impl RequestRun {
    /// A request over `pairs` keeping its top `k` (at least 1, at most the candidates).
    pub(crate) fn new(
        pairs: Vec<EncodedPair>,
        k: usize,
        prune: Option<&PruneConfig>,
        info: &ModelInfo,
        chunks: ChunkPolicy<'_>,
        mode: &str,
    ) -> Result<RequestRun> {
        if pairs.is_empty() {
            return Err(GratingError::InvalidInput(
                "a request needs at least one document".into(),
            ));
        }
        if k == 0 {
            return Err(GratingError::InvalidInput(
                "top_k must be at least 1 (omit it to rank every document)".into(),
            ));
        }
        let n = pairs.len();
        let chunk_tokens = chunks.chunk_tokens.max(1);
        let observer = match prune {
            Some(cfg) => Observer::Prune(PruneState::new(cfg, n, k.min(n), info.num_layers)),
            None => Observer::Record(Vec::new()),
        };
        let spill = match chunks.offload {
            Some(dir) => Some(SpillFile::new(dir)?),
            None => None,
        };
        let order = length_order(&pairs);
        let stats = RequestStats {
            mode: mode.into(),
            candidates: n,
            tokens: pairs.iter().map(EncodedPair::len).sum(),
            truncated: pairs.iter().filter(|p| p.truncated).count(),
            num_layers: info.num_layers,
            ..Default::default()
        };
        Ok(RequestRun {
            to_embed: plan_chunks(&pairs, &order, chunk_tokens).into(),
            layers_done: vec![0; n],
            pairs,
            info: info.clone(),
            chunk_tokens,
            observer,
            chunks: Vec::new(),
            spill,
            placement: (DType::F32, Device::Cpu),
            layer: 0,
            next_chunk: 0,
            early_scores: Vec::new(),
            attained: 0,
            layer_tokens: 0,
            layer_seconds: 0.0,
            finals: Vec::new(),
            done: false,
            stats,
        })
    }

    /// Embeds the next chunk; true once every chunk is embedded.
    pub(crate) fn embed_next(&mut self, model: &dyn RerankModel) -> Result<bool> {
        let t = Instant::now();
        if let Some(members) = self.to_embed.pop_front() {
            let batch = pack(&self.pairs, &members);
            let hidden = model.embed(&batch)?;
            self.placement = (hidden.dtype(), hidden.device().clone());
            let hidden = match &self.spill {
                Some(s) => s.spill(&hidden)?,
                None => Hidden::Resident(hidden),
            };
            self.chunks.push(Chunk {
                members,
                batch,
                hidden,
            });
        }
        self.stats.compute_seconds += t.elapsed().as_secs_f64();
        Ok(self.to_embed.is_empty())
    }

    /// Embeds every chunk still to embed.
    pub(crate) fn embed_all(&mut self, model: &dyn RerankModel) -> Result<()> {
        while !self.embed_next(model)? {}
        Ok(())
    }

    /// Tokens still to embed.
    pub(crate) fn tokens_left_to_embed(&self) -> usize {
        self.to_embed
            .iter()
            .flatten()
            .map(|&m| self.pairs[m].len())
            .sum()
    }

    /// Chunks still to embed.
    #[cfg(test)]
    pub(crate) fn chunks_to_embed(&self) -> usize {
        self.to_embed.len()
    }

    pub(crate) fn candidates(&self) -> usize {
        self.pairs.len()
    }

    /// The 0-based layer its next chunks run.
    pub(crate) fn layer(&self) -> usize {
        self.layer
    }

    /// True once its answer is decided (top K known, or its last layer scored).
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// Token-layers computed so far.
    pub(crate) fn attained(&self) -> u64 {
        self.attained
    }

    /// Its tokens when admitted, before any pruning.
    pub(crate) fn admitted_tokens(&self) -> usize {
        self.stats.tokens
    }

    /// Tokens of each live chunk, in order.
    pub(crate) fn live_chunk_tokens(&self) -> Vec<usize> {
        self.chunks.iter().map(|c| c.batch.num_tokens()).collect()
    }

    /// How many of its chunks at the current layer have already run.
    pub(crate) fn chunks_done_at_layer(&self) -> usize {
        self.next_chunk.min(self.chunks.len())
    }

    pub(crate) fn stats_mut(&mut self) -> &mut RequestStats {
        &mut self.stats
    }

    /// Whether the scores after the current layer can change anything.
    fn wants_scores(&self) -> bool {
        let layer_no = self.layer + 1;
        layer_no == self.info.num_layers
            || match &self.observer {
                Observer::Prune(st) => st.wants_scores(layer_no),
                Observer::Record(_) => true,
            }
    }

    /// Runs `layer` (the current layer's weights) over its next `n` chunks. Returns whether
    /// that completed the layer, which [`RequestRun::complete_layer`] must then finish.
    pub(crate) fn run_chunks(
        &mut self,
        model: &dyn RerankModel,
        layer: &dyn LayerBlock,
        n: usize,
    ) -> Result<bool> {
        let t = Instant::now();
        let start = self.next_chunk.min(self.chunks.len());
        let end = start.saturating_add(n).min(self.chunks.len());
        if self.spill.is_some() {
            self.run_offloaded(model, layer, start..end)?;
        } else {
            for i in start..end {
                let out =
                    layer.forward(self.chunks[i].hidden.resident()?, &self.chunks[i].batch)?;
                self.chunks[i].hidden = Hidden::Resident(out);
                self.count_chunk(i);
            }
        }
        self.next_chunk = end;
        let secs = t.elapsed().as_secs_f64();
        self.layer_seconds += secs;
        self.stats.compute_seconds += secs;
        Ok(self.next_chunk >= self.chunks.len())
    }

    /// Counts chunk `i` as run at the current layer.
    fn count_chunk(&mut self, i: usize) {
        let chunk = &self.chunks[i];
        let tokens = chunk.batch.num_tokens();
        self.layer_tokens += tokens;
        self.attained += tokens as u64;
        for (&m, &(_, len)) in chunk.members.iter().zip(&chunk.batch.layout.spans) {
            self.layers_done[m] += 1;
            self.stats.flops += self.info.layer_flops(len);
        }
    }

    /// [`RequestRun::run_chunks`] with offloaded hidden states: chunk i+1 is read back and
    /// chunk i-1 written out while chunk i computes, and scores are taken before a chunk goes
    /// back to disk.
    fn run_offloaded(
        &mut self,
        model: &dyn RerankModel,
        layer: &dyn LayerBlock,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let wants = self.wants_scores();
        let (dtype, device) = self.placement.clone();
        let spill = self
            .spill
            .take()
            .expect("offloaded requests have a spill file");
        let result = (|| -> Result<()> {
            let s = &spill;
            let mut next = match self.chunks.get(range.start) {
                Some(c) if !range.is_empty() => Some(c.hidden.get(Some(s), dtype, &device)?),
                _ => None,
            };
            let mut pending_write: Option<(usize, Tensor)> = None;
            for i in range.clone() {
                let input = match next.take() {
                    Some(t) => t,
                    None => self.chunks[i].hidden.get(Some(s), dtype, &device)?,
                };
                let ahead = (i + 1 < range.end).then(|| match &self.chunks[i + 1].hidden {
                    Hidden::Spilled { at, rows, dim } => Ok((*at, *rows, *dim)),
                    Hidden::Resident(_) => Err(GratingError::Internal(
                        "an offloaded chunk was resident between layers".into(),
                    )),
                });
                let ahead = ahead.transpose()?;
                let behind = pending_write.take();
                let batch = &self.chunks[i].batch;
                let dev = &device;
                let (out, read, written) = std::thread::scope(|sc| {
                    let reader = ahead
                        .map(|(at, rows, dim)| sc.spawn(move || s.load(at, rows, dim, dtype, dev)));
                    let writer =
                        behind.map(|(ci, t)| sc.spawn(move || s.spill(&t).map(|h| (ci, h))));
                    let out = layer.forward(&input, batch);
                    let join_err = || GratingError::Internal("an offload thread panicked".into());
                    let read = reader.map(|h| h.join().unwrap_or_else(|_| Err(join_err())));
                    let written = writer.map(|h| h.join().unwrap_or_else(|_| Err(join_err())));
                    (out, read, written)
                });
                if let Some(w) = written {
                    let (ci, h) = w?;
                    self.chunks[ci].hidden = h;
                }
                next = read.transpose()?;
                let out = out?;
                drop(input);
                self.count_chunk(i);
                if wants {
                    let chunk = &self.chunks[i];
                    let scores = model.score(&out, &chunk.batch)?;
                    self.early_scores
                        .extend(chunk.members.iter().copied().zip(scores));
                }
                pending_write = Some((i, out));
            }
            if let Some((ci, t)) = pending_write {
                self.chunks[ci].hidden = s.spill(&t)?;
            }
            Ok(())
        })();
        self.spill = Some(spill);
        result
    }

    /// Finishes a layer it has run over all its chunks: scores, prunes and repacks. `waited`
    /// is the time the caller spent obtaining the layer's weights and `stall` the part of it
    /// spent waiting for streamed bytes (both 0 when a scheduler accounts for them itself).
    pub(crate) fn complete_layer(
        &mut self,
        model: &dyn RerankModel,
        waited: f64,
        stall: f64,
    ) -> Result<()> {
        let t = Instant::now();
        let layer_no = self.layer + 1;
        let is_last = layer_no == self.info.num_layers;
        let live_before: usize = self.chunks.iter().map(|c| c.members.len()).sum();
        if self.wants_scores() {
            let (ids, scores): (Vec<usize>, Vec<f32>) = if self.spill.is_some() {
                std::mem::take(&mut self.early_scores).into_iter().unzip()
            } else {
                let mut ids = Vec::with_capacity(live_before);
                let mut scores = Vec::with_capacity(live_before);
                for chunk in &self.chunks {
                    ids.extend_from_slice(&chunk.members);
                    scores.extend(model.score(chunk.hidden.resident()?, &chunk.batch)?);
                }
                self.mark("score");
                (ids, scores)
            };
            let mut repack_needed = false;
            match &mut self.observer {
                Observer::Record(rec) => {
                    let mut row = vec![f32::NAN; self.pairs.len()];
                    for (&i, &s) in ids.iter().zip(&scores) {
                        row[i] = s;
                    }
                    rec.push(row);
                }
                Observer::Prune(st) if !is_last => {
                    repack_needed = st.observe(layer_no, &ids, &scores);
                }
                Observer::Prune(_) => {}
            }
            if repack_needed {
                self.repack_live()?;
            }
            if is_last {
                self.finals = ids.into_iter().zip(scores).collect();
            }
        }
        let own = t.elapsed().as_secs_f64();
        self.stats.compute_seconds += own + waited;
        self.stats.stall_seconds += stall;
        self.stats.layer_timings.push(LayerTiming {
            layer: layer_no,
            live_candidates: live_before,
            tokens: self.layer_tokens,
            seconds: self.layer_seconds + own + waited,
            stall_seconds: stall,
        });
        self.layer_tokens = 0;
        self.layer_seconds = 0.0;
        self.layer += 1;
        self.next_chunk = 0;
        self.done = is_last || self.chunks.is_empty();
        Ok(())
    }

    /// Gathers the survivors of a pruning decision into fresh chunks.
    fn repack_live(&mut self) -> Result<()> {
        let Observer::Prune(st) = &self.observer else {
            return Ok(());
        };
        let chunks = std::mem::take(&mut self.chunks);
        let (dtype, device) = &self.placement;
        self.chunks = repack(
            chunks,
            |m| st.is_live(m),
            &self.pairs,
            self.chunk_tokens,
            self.spill.as_ref(),
            (*dtype, device),
        )?;
        self.mark("repack");
        Ok(())
    }

    /// A stage mark for the accelerator profile (a no-op unless profiling is on).
    fn mark(&self, stage: &'static str) {
        if let Some(Ok(t)) = self.chunks.first().map(|c| c.hidden.resident()) {
            crate::ops::profile::mark(stage, t);
        }
    }

    /// Stats common to every way a request ends.
    fn close_stats(&mut self) {
        self.chunks.clear();
        self.stats.layers_per_candidate = std::mem::take(&mut self.layers_done);
        if let Some(s) = &self.spill {
            self.stats.offloaded_bytes = s.bytes_written.load(std::sync::atomic::Ordering::Relaxed);
        }
        if let Observer::Prune(st) = &self.observer {
            self.stats.prune_events = st.events().to_vec();
        }
        self.stats.finish_counts();
    }

    /// The answer of a pruning request: its top K, best first (once; the run is spent after).
    pub(crate) fn finish(&mut self) -> Result<RerankOutput> {
        let Observer::Prune(st) = &self.observer else {
            return Err(GratingError::Internal(
                "a recording request has no ranking".into(),
            ));
        };
        let ranked: Vec<Scored> = st
            .ranking(&self.finals)
            .into_iter()
            .map(|(index, logit)| Scored { index, logit })
            .collect();
        super::check_finite(&ranked)?;
        self.close_stats();
        Ok(RerankOutput {
            ranked,
            stats: std::mem::take(&mut self.stats),
        })
    }

    /// The scores of a recording request (`[layer][candidate]`) and its stats.
    pub(crate) fn finish_record(&mut self) -> Result<(Vec<Vec<f32>>, RequestStats)> {
        self.close_stats();
        match std::mem::replace(&mut self.observer, Observer::Record(Vec::new())) {
            Observer::Record(rec) => Ok((rec, std::mem::take(&mut self.stats))),
            Observer::Prune(_) => Err(GratingError::Internal(
                "a pruning request has no recorded scores".into(),
            )),
        }
    }

    /// Drops its hidden states early (a cancelled or failed request).
    pub(crate) fn release(&mut self) {
        self.chunks.clear();
        self.to_embed.clear();
        self.done = true;
    }
}
