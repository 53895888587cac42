import sys, time, json, os, taipan_jax
from taipan_jax.train import train
K = {"model.vocab_size": 64, "data.num_kv_pairs": 4, "data.seq_len": 32, "train.steps": 3000}
V = {
 "ref": {**K},
 "v32": {**K, "model.vocab_size": 32},
 "lr6e-3": {**K, "optim.peak_lr": 6e-3},
 "bs64": {**K, "train.batch_size": 64},
 "v32_bs16": {**K, "model.vocab_size": 32, "train.batch_size": 16},
 "const_lr": {**K, "optim.final_lr": 3e-3, "optim.warmup_steps": 20},
 "ds32_q8": {**K, "mamba.d_state": 32, "mamba.chunk_size": 8},
 "v32_lr6e-3_bs64": {**K, "model.vocab_size": 32, "optim.peak_lr": 6e-3, "train.batch_size": 64},
}
res = {}
for name, ov in V.items():
  ov = dict(ov); ov.setdefault("train.steps", 2000); ov["train.log_every"] = 250
  cfg = taipan_jax.load_config("tiny", ov)
  t = time.time(); h = train(cfg, log=lambda s: None)
  res[name] = [(r["step"], round(r["eval_accuracy"], 3)) for r in h]
  print(name, res[name], f"{time.time()-t:.0f}s", flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "mqar_sweep.json"), "w"))
