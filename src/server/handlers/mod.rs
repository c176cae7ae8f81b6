//! The endpoints: the rerank shapes in [`rerank`], everything else in [`meta`].

pub(super) mod meta;
pub(super) mod rerank;
