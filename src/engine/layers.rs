//! The one place that decides where a layer's weights come from while requests run: resident
//! in the model, re-read from the memory-mapped checkpoint, or streamed from disk two layers at
//! a time, with a small cache of built layers and read-ahead of the layers announced next.
//! The single-request loop, full mode and the server's scheduler all obtain layers here.

use crate::error::Result;
use crate::models::{LayerBlock, RerankModel};
use crate::weights::plan::LayerPlan;
use crate::weights::stream::LayerStream;
use crate::weights::{PreadFiles, TensorSource};
use candle_core::{DType, Device};
use std::collections::VecDeque;
use std::sync::Arc;

/// What a streaming store needs to read layers.
#[derive(Clone)]
pub(crate) struct Streaming {
    pub files: Arc<PreadFiles>,
    pub plans: Arc<Vec<LayerPlan>>,
    pub dtype: DType,
    pub device: Device,
    /// Share of the vocabulary the embedding-row cache may keep.
    pub cache_share: f32,
    /// Threads that read a layer bound for a GPU.
    pub read_threads: usize,
}

impl Streaming {
    fn start(&self, order: Vec<usize>) -> LayerStream {
        LayerStream::start(
            self.files.clone(),
            self.plans.clone(),
            order,
            self.dtype,
            self.device.clone(),
            self.read_threads,
        )
    }
}

/// Where layers come from.
#[derive(Clone)]
pub(crate) enum LayerSource {
    /// The model's resident layers.
    Resident,
    /// Rebuilt from this source (the memory-mapped checkpoint, in the compute dtype and on the
    /// compute device) whenever a layer is needed and not built: a stand-in for streaming that
    /// measures what sharing a layer read saves without the I/O thread.
    Reload(Arc<dyn TensorSource + Send + Sync>),
    /// Read with `pread` from disk, ahead of use.
    Stream(Streaming),
}

impl LayerSource {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            LayerSource::Resident => "resident",
            LayerSource::Reload(_) => "reload",
            LayerSource::Stream(_) => "stream",
        }
    }
}

/// What obtaining layers cost, for stats and the server's counters.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LayerCounters {
    /// Layers that had to be obtained (not found built).
    pub loads: u64,
    /// Streamed loads whose bytes were already being read ahead.
    pub read_ahead_hits: u64,
    /// Seconds callers waited for streamed bytes.
    pub stall_seconds: f64,
    /// Seconds the reader took to read the streamed layers used (mostly overlapped).
    pub read_seconds: f64,
}

/// Supplies layers to one driver (a request loop or the scheduler).
pub(crate) struct LayerProvider {
    model: Arc<dyn RerankModel>,
    source: LayerSource,
    /// Built layers kept between calls, least recently used first (at most `keep`).
    keep: usize,
    built: VecDeque<(usize, Arc<dyn LayerBlock>)>,
    /// The stream in flight and the layers it will still deliver, in order.
    stream: Option<(VecDeque<usize>, LayerStream)>,
    counters: LayerCounters,
}

impl LayerProvider {
    /// A provider keeping up to `keep` built layers (0: none, so a streamed layer's memory goes
    /// as soon as the caller drops it).
    pub(crate) fn new(model: Arc<dyn RerankModel>, source: LayerSource, keep: usize) -> Self {
        LayerProvider {
            model,
            source,
            keep,
            built: VecDeque::new(),
            stream: None,
            counters: LayerCounters::default(),
        }
    }

    pub(crate) fn counters(&self) -> LayerCounters {
        self.counters
    }

    /// Announces the layers the caller will ask for next, in order: streamed ones are read
    /// ahead (two at a time). A layer already built, or already the next being read, is not
    /// read again.
    pub(crate) fn expect(&mut self, order: &[usize]) {
        let LayerSource::Stream(s) = &self.source else {
            return;
        };
        let Some(&first) = order.first() else {
            return;
        };
        let built = self.built.iter().any(|(l, _)| *l == first);
        let coming = self
            .stream
            .as_ref()
            .is_some_and(|(pending, _)| pending.front() == Some(&first));
        if order.len() == 1 && (built || coming) {
            return;
        }
        self.stream = Some((order.iter().copied().collect(), s.start(order.to_vec())));
    }

    /// Layer `l`, and the seconds spent waiting for its streamed bytes.
    pub(crate) fn get(&mut self, l: usize) -> Result<(Arc<dyn LayerBlock>, f64)> {
        if let Some(i) = self.built.iter().position(|(bl, _)| *bl == l) {
            let entry = self.built.remove(i).expect("position is in range");
            let block = entry.1.clone();
            self.built.push_back(entry);
            return Ok((block, 0.0));
        }
        // Evicted before the new layer is built: at most `keep` are held.
        while self.keep > 0 && self.built.len() >= self.keep {
            self.built.pop_front();
        }
        self.counters.loads += 1;
        let (block, stall) = self.load(l)?;
        if self.keep > 0 {
            self.built.push_back((l, block.clone()));
        }
        Ok((block, stall))
    }

    fn load(&mut self, l: usize) -> Result<(Arc<dyn LayerBlock>, f64)> {
        let s = match &self.source {
            LayerSource::Resident => return Ok((self.model.layer(l)?, 0.0)),
            LayerSource::Reload(src) => return Ok((self.model.load_layer(l, src.as_ref())?, 0.0)),
            LayerSource::Stream(s) => s,
        };
        let (mut pending, mut stream) = match self.stream.take() {
            Some((pending, st)) if pending.front() == Some(&l) => {
                self.counters.read_ahead_hits += 1;
                (pending, st)
            }
            _ => (VecDeque::from([l]), s.start(vec![l])),
        };
        let read_before = stream.read_seconds();
        let model = &self.model;
        let (block, stall) = stream.next_with(l, |src| model.load_layer(l, src))?;
        self.counters.stall_seconds += stall;
        self.counters.read_seconds += stream.read_seconds() - read_before;
        pending.pop_front();
        if !pending.is_empty() {
            self.stream = Some((pending, stream));
        }
        Ok((block, stall))
    }

    /// Ends the reads in flight (a pass is over or went elsewhere).
    pub(crate) fn end(&mut self) {
        self.stream = None;
    }
}
