//! The OpenAPI 3.1 document served at `/openapi.json`, written by hand (no codegen crate).

use serde_json::{json, Value};

pub fn document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let err =
        |d: &str| json!({"description": d, "content": {"application/json": {"schema": error}}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "capt-edge",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Image classification with an exported capt (CLIP prompt-tuned) model."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                        "code": {"type": "string", "examples": ["bad_image", "queue_full", "body_too_large"]},
                        "message": {"type": "string"}
                    }}}
                },
                "Label": {"type": "object", "required": ["label", "class_index", "probability", "logit"], "properties": {
                    "label": {"type": "string"},
                    "class_index": {"type": "integer"},
                    "probability": {"type": "number"},
                    "logit": {"type": "number"}
                }},
                "ClassifyResponse": {"type": "object", "required": ["model", "results", "timing"], "properties": {
                    "model": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"}}},
                    "results": {"type": "array", "items": {"type": "object", "properties": {
                        "index": {"type": "integer"},
                        "name": {"type": "string", "description": "multipart file name, or \"body\""},
                        "top_k": {"type": "array", "items": {"$ref": "#/components/schemas/Label"}}
                    }}},
                    "timing": {"type": "object", "properties": {
                        "decode_ms": {"type": "number"},
                        "queue_ms": {"type": "number"},
                        "inference_ms": {"type": "number"},
                        "total_ms": {"type": "number"},
                        "batch_size": {"type": "integer", "description": "images in the backend batch this request joined"}
                    }}
                }}
            }
        },
        "security": [{"bearer": []}],
        "x-request-id": "Every response carries X-Request-Id: the client's when it is 1-128 characters of [A-Za-z0-9._-], else a new one; the request's log lines carry it too.",
        "paths": {
            "/v1/classify": {"post": {
                "summary": "Classify one image (raw body) or several (multipart/form-data, one file part each).",
                "parameters": [{"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1}}],
                "requestBody": {"required": true, "content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {"schema": {"type": "object", "additionalProperties": {"type": "string", "format": "binary"}}}
                }},
                "responses": {
                    "200": {"description": "top-k labels per image", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ClassifyResponse"}}}},
                    "400": err("undecodable image, empty body, malformed multipart or bad query"),
                    "401": err("missing or wrong API key"),
                    "413": err("body, image size or image count above the limits"),
                    "415": err("unsupported content type"),
                    "503": err("queue full (see Retry-After) or shutting down"),
                    "504": err("request timed out")
                }
            }},
            "/v1/model": {"get": {"summary": "Model name, version, classes, preprocessing, backend, limits.",
                "responses": {"200": {"description": "model description"}, "401": err("missing or wrong API key")}}},
            "/healthz": {"get": {"summary": "Liveness (no auth); `?deep=1` runs one image through the queue and the backend.", "security": [],
                "parameters": [{"name": "deep", "in": "query", "schema": {"type": "string", "enum": ["0", "1", "true", "false"]}}],
                "responses": {"200": {"description": "alive (deep: the model answered)"}, "503": {"description": "deep check failed (the reason is in the body)"}}}},
            "/readyz": {"get": {"summary": "Readiness (no auth); 503 while shutting down.", "security": [],
                "responses": {"200": {"description": "ready"}, "503": {"description": "shutting down"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics.", "responses": {"200": {"description": "text exposition format 0.0.4"}}}},
            "/openapi.json": {"get": {"summary": "This document.", "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        }
    })
}
