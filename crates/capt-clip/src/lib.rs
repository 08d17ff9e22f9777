//! `capt-clip` owns the CLIP backbone used by the trainer: text and vision towers written on
//! autograd-safe candle ops (so prompt gradients flow), with slots for learned prompt
//! embeddings, deep prompts and visual prompts, and loading of HF-format / OpenAI checkpoints.
