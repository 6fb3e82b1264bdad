//! Fuzzes the adapter-file loader (`elra::io::AdapterFile::from_bytes`): any input must give an
//! error or an adapter that validates and survives a save/load round trip unchanged; never a
//! panic, never unbounded allocation.
//!
//! The first byte selects the mode: 0 → the rest is a weights file under a fixed LoRA config,
//! 1 → the same under a fixed ELRA config, otherwise the next two bytes give the config length
//! and the input is split into config JSON and weights.
#![no_main]

use elra::io::{AdapterFile, LoadLimits};
use libfuzzer_sys::fuzz_target;

const LORA: &[u8] = br#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q","v"]}"#;
const ELRA: &[u8] = br#"{"peft_type":"ELRA","variant":"general","r":2,"eta":0.001,"lambda":1e-5,"tau":2.0,"alpha_schedule":{"type":"exponential","warmup_steps":5,"gamma":5.0},"eta_multiplier":{"type":"none"},"step":0,"target_modules":["m.q"],"format_version":1}"#;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (cfg, weights): (&[u8], &[u8]) = match mode {
        0 => (LORA, rest),
        1 => (ELRA, rest),
        _ => {
            if rest.len() < 2 {
                return;
            }
            let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
            let rest = &rest[2..];
            let n = n.min(rest.len());
            (&rest[..n], &rest[n..])
        }
    };
    let limits = LoadLimits {
        max_weights_bytes: 1 << 20,
        max_config_bytes: 1 << 16,
        max_dim: 4096,
        max_modules: 64,
    };
    if let Ok(f) = AdapterFile::<f64>::from_bytes_with(cfg, weights, &limits) {
        f.validate().expect("a loaded adapter validates");
        let (c2, w2) = f.to_bytes().expect("a loaded adapter serialises");
        let g = AdapterFile::<f64>::from_bytes(&c2, &w2).expect("a saved adapter reloads");
        assert_eq!(g, f, "round trip changed the adapter");
    }
    let _ = AdapterFile::<f32>::from_bytes_with(cfg, weights, &limits);
});
