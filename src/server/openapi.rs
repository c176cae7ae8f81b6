//! The OpenAPI description, generated from the handlers' annotations so it cannot drift from
//! the routes; `/openapi.json` serves it and `/docs` renders it.

use super::api::*;
use super::error::ErrorBody;
use super::handlers::{meta, rerank};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "grating",
        description = "Top-K reranking with cross-encoders: GRATING's monolithic layer-major forwarding with progressive pruning, shared across concurrent requests."
    ),
    paths(
        rerank::rerank_v1,
        rerank::rerank_v2,
        rerank::rerank_root,
        meta::health,
        meta::ready,
        meta::info,
        meta::models,
        meta::metrics_text
    ),
    components(schemas(
        RerankRequest, RerankResponse, CohereResponse, CohereResult, DocumentInput, DocumentObject, Meta, Usage,
        ApiVersion, BilledUnits, GratingStats, TeiResult, TruncationDirection, Info, TeiInfo,
        TeiModelType, TeiClassifier, ModelList, ModelCard, Limits, Health, ErrorBody
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// Declares the `bearer` scheme the protected paths name in their `security`.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
