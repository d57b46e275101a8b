"""Trust and safety, offline: what guards text going into and out of a model.

- `watermark.py`: the green-list logits watermark (Kirchenbauer et al. 2023) and its z-test;
  `secret_key.py` reads the key (never printed); `watermark_robustness.py` measures detection
  after random token substitution and deletion.
- `model_watermark.py`: a keyed watermark in a model's weights (spread-spectrum bits in the block
  matrices, post hoc), read back with a bit error rate and an exact binomial p-value; it survives
  fine-tuning, int8 quantization and magnitude pruning. The model is loaded by the CLI and handed
  in, and the CLI writes the marked run (checkpoint/weights_run.py).
- `normalize.py`: a matching view of text that folds obfuscation (case, leetspeak, invisible
  characters, homoglyphs, accents) with a map back to the original characters.
- `filter_config.py` + `matcher.py`: the harmful-content filter (categories and lexicons from TOML,
  whole-word matches that survive spacing and punctuation inside words).
- `gates.py`: the prompt gate (refuse with a policy message) and the streaming output gate (holds
  back only what could still become a blocked term; stops or masks); every block is logged with
  its category, never the term or a key.
- `adversarial.py`: the crafted-prompt detector (invisible characters, character perturbations,
  gibberish suffixes, windowed-perplexity change points) with a score and a threshold;
  `attacks.py` generates such prompts for red-team measurement.

Imports only `config`, `storage`, `checkpoint` (to write a marked run) and `tensors` of lmforge; a
model is reached through a scoring callable or handed in, never loaded here, so `data` and `serve`
can both use this package.
"""
