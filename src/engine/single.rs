//! Monolithic forwarding of one request alone: every candidate advances one layer at a time,
//! so after each layer the engine sees all live candidates' scores together and can prune.
//! This is a loop over the request state machine ([`super::request`]); the server's scheduler
//! drives the same machine for many requests at once.

use super::layers::LayerProvider;
use super::request::RequestRun;
use super::Progress;
use crate::error::Result;
use crate::models::RerankModel;
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

/// Runs `run` to its end, layer by layer, with every chunk of a layer in one go.
pub(crate) fn drive(
    model: &dyn RerankModel,
    layers: &mut LayerProvider,
    run: &mut RequestRun,
    progress: Option<&dyn Progress>,
) -> Result<()> {
    let _span = tracing::debug_span!("monolithic", candidates = run.candidates()).entered();
    run.embed_all(model)?;
    let num_layers = model.info().num_layers;
    layers.expect(&(0..num_layers).collect::<Vec<_>>());
    let result = (|| {
        while !run.is_done() {
            let l = run.layer();
            let _layer_span = tracing::trace_span!("layer", layer = l + 1).entered();
            let t = Instant::now();
            let (block, stall) = layers.get(l)?;
            let waited = t.elapsed().as_secs_f64();
            run.run_chunks(model, block.as_ref(), usize::MAX)?;
            // The layer's weights go before the next layer's are built (streaming keeps two
            // layers' bytes, not three built layers).
            drop(block);
            run.complete_layer(model, waited, stall)?;
            if let Some(p) = progress {
                p.step(l + 1, num_layers);
            }
        }
        Ok(())
    })();
    layers.end();
    result
}
