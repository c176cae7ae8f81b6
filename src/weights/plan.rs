//! Where each layer's tensors lie in the checkpoint: the read plan the streaming store and the
//! GPU staging buffers share.

use super::{TensorEntry, WeightIndex};
use crate::error::{GratingError, Result};
use candle_core::Tensor;

/// Where one layer's tensors are on disk.
#[derive(Debug, Clone)]
pub struct LayerPlan {
    pub tensors: Vec<(String, TensorEntry)>,
    pub bytes: usize,
}

impl LayerPlan {
    /// Tensor `name`'s byte offset in the layer's read buffer (tensors lie end to end in plan
    /// order) and its entry.
    pub fn locate(&self, name: &str) -> Option<(usize, &TensorEntry)> {
        let mut off = 0;
        for (n, e) in &self.tensors {
            if n == name {
                return Some((off, e));
            }
            off += e.byte_len();
        }
        None
    }

    /// [`TensorSource::get`] over a buffer of this plan: `build(offset, entry)` makes the
    /// tensor once `name` is found.
    pub(crate) fn get_with(
        &self,
        name: &str,
        build: impl FnOnce(usize, &TensorEntry) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self.locate(name) {
            Some((off, e)) => build(off, e),
            None => Err(GratingError::MissingTensor {
                name: name.to_string(),
            }),
        }
    }

    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.locate(name).map(|(_, e)| e.shape.clone())
    }
}

/// The read plan of every layer: all tensors under each layer's name prefix (`prefix(l)`,
/// which the model file knows; the store does not).
pub fn layer_plans(
    index: &WeightIndex,
    num_layers: usize,
    prefix: impl Fn(usize) -> String,
) -> Result<Vec<LayerPlan>> {
    (0..num_layers)
        .map(|l| {
            let prefix = prefix(l);
            let mut tensors: Vec<(String, TensorEntry)> = index
                .entries
                .iter()
                .filter(|(n, _)| n.starts_with(&prefix))
                .map(|(n, e)| (n.clone(), e.clone()))
                .collect();
            if tensors.is_empty() {
                return Err(GratingError::MissingTensor {
                    name: format!("{prefix}*"),
                });
            }
            // File order makes the reads sequential.
            tensors.sort_by_key(|(_, e)| (e.file, e.start));
            let bytes = tensors.iter().map(|(_, e)| e.byte_len()).sum();
            Ok(LayerPlan { tensors, bytes })
        })
        .collect()
}
