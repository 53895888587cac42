"""The config schema: every field taipan-jax reads, with its default.

Model and baseline files start from `get_config()` here and change a few values. The loader
(`taipan_jax.config.load_config`) rejects any key that is not in this schema, so a typo in a
config file or on the command line stops the run instead of being silently ignored.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.name = "base"

  # --- the language model -------------------------------------------------------------------
  cfg.model = ml_collections.ConfigDict()
  cfg.model.vocab_size = 128256          # Llama-3 vocabulary (docs/spec.md section 6)
  cfg.model.pad_vocab_multiple = 16      # embedding rows padded to a multiple of this
  cfg.model.d_model = 768                # width of the residual stream
  # One character per layer: 'm' Mamba-2 block, 's' Selective Attention Layer,
  # 'a' full causal attention block with RoPE (Transformer++ / Jamba baselines).
  cfg.model.pattern = "mmmmmms"
  cfg.model.num_units = 3                # the pattern is repeated this many times
  cfg.model.tie_embeddings = True        # the LM head is the embedding matrix
  cfg.model.norm_eps = 1e-5              # RMSNorm epsilon
  cfg.model.dtype = "float32"            # compute dtype of matmuls ("bfloat16" on accelerators)
  cfg.model.param_dtype = "float32"      # storage dtype of parameters and optimizer state
  cfg.model.mlp_hidden = 0               # SwiGLU width of 's' and 'a' layers; 0: 8/3*d to 128

  # --- Mamba-2 blocks (docs/spec.md section 2, decision k) ------------------------------------------
  cfg.mamba = ml_collections.ConfigDict()
  cfg.mamba.d_state = 128                # SSM state size N per head
  cfg.mamba.d_conv = 4                   # causal depthwise convolution width
  cfg.mamba.expand = 2                   # inner width = expand * d_model
  cfg.mamba.head_dim = 64                # P: channels per SSM head
  cfg.mamba.n_groups = 1                 # B/C groups shared by the heads
  cfg.mamba.chunk_size = 256             # SSD chunk length (multiple of 8 for the kernels)
  cfg.mamba.kernel = "auto"              # SSD + decode: auto | xla | pallas (ops/dispatch.py)
  cfg.mamba.interpret = False            # run those Pallas kernels in interpret mode (any host)
  cfg.mamba.a_init_min = 1.0             # A = -exp(A_log) initialised uniformly in [min, max]
  cfg.mamba.a_init_max = 16.0
  cfg.mamba.dt_min = 1e-3                # initial dt log-uniform in [dt_min, dt_max]
  cfg.mamba.dt_max = 0.1
  cfg.mamba.dt_init_floor = 1e-4         # lower clip of the initial dt

  # --- Selective Attention Layers (docs/spec.md section 3, decisions a-g) ---------------------------
  cfg.sal = ml_collections.ConfigDict()
  cfg.sal.head_dim = 64                  # attention head width (heads = d_model / head_dim)
  cfg.sal.window = 2048                  # sliding window: a token sees the last `window` tokens
  cfg.sal.capacity = 0.15                # budget C: target selected fraction
  cfg.sal.tau = 1.0                      # Gumbel-softmax temperature
  cfg.sal.tau_final = config_dict.placeholder(float)   # set: anneal tau linearly to this
  cfg.sal.gate_hidden = 0                # 0: Dense(d -> 2); >0: 2-layer MLP gate
  cfg.sal.kv_selected_only = False       # decision (a): keys are all tokens of the window
  cfg.sal.selection = "gumbel"           # "gumbel" (Taipan) or "all" (SWA-only hybrid)
  # What the straight-through gradient of an unselected token's mask sees as the attention
  # output in training (docs/decisions.md, added decision 2): "zero" (attention runs for the
  # selected rows only) or "attention" (it runs for every row; an ablation, at dense cost).
  cfg.sal.straight_through = "zero"
  # Dense-to-sparse warm-up (docs/decisions.md, added decision 7): > 0 also selects, in
  # training, each token the gate did not pick with a probability falling linearly from 1 to 0
  # over these steps, so attention learns on every kind of token before the gate must choose.
  # 0: the paper's training.
  cfg.sal.dense_warmup_steps = 0
  cfg.sal.rope = False                   # decision (g): no positional encoding
  cfg.sal.inference_capacity = config_dict.placeholder(int)  # cap on selected per window
  # Selection in eval mode and decoding (docs/decisions.md, "Inference selection"):
  # "positional_gumbel" the training draw with noise fixed by position (selects as training
  # did); "sign" [s1 > s0] (selects ~nothing once trained to a budget); "window_rank" /
  # "window_expected" causal top-k of each window; "none" / "all" switch the SAL off / on.
  cfg.sal.inference_selection = "positional_gumbel"
  cfg.sal.kernel = "auto"                # attention: auto | xla | pallas (ops/dispatch.py)
  cfg.sal.interpret = False              # run those Pallas kernels in interpret mode (any host)

  # --- full attention ('a' layers) ----------------------------------------------------------
  cfg.attention = ml_collections.ConfigDict()
  cfg.attention.head_dim = 64            # full attention head width
  cfg.attention.rope_theta = 10000.0     # RoPE base ('a' layers; SAL with sal.rope)
  cfg.attention.max_cache_len = 4096     # KV cache length for token-by-token decoding

  # --- loss ---------------------------------------------------------------------------------
  cfg.loss = ml_collections.ConfigDict()
  cfg.loss.budget_weight = 1.0           # lambda of docs/spec.md section 4
  cfg.loss.ce_chunk = 512                # LM head + loss fused, <= this many positions a step; 0: unfused

  # --- optimizer (docs/spec.md section 7, decision j) -----------------------------------------------
  cfg.optim = ml_collections.ConfigDict()
  cfg.optim.peak_lr = 5e-4               # AdamW, linear warmup then cosine decay
  cfg.optim.final_lr = 1e-5              # learning rate at the last step
  cfg.optim.warmup_steps = 2000          # linear warmup from 0
  cfg.optim.b1 = 0.9                     # Adam beta1
  cfg.optim.b2 = 0.95                    # Adam beta2
  cfg.optim.eps = 1e-8                   # Adam epsilon
  cfg.optim.weight_decay = 0.01          # decoupled, on matrices only
  cfg.optim.grad_clip = 1.0              # global gradient-norm clip

  # --- training loop -----------------------------------------------------------------------
  cfg.train = ml_collections.ConfigDict()
  cfg.train.seed = 0                     # parameters, data order and Gumbel noise
  cfg.train.steps = 51_500               # optimizer steps
  cfg.train.batch_size = 128             # sequences per optimizer step, over all processes
  cfg.train.grad_accum_steps = 1         # micro-batches per step (batch_size divisible by it)
  cfg.train.log_every = 50               # steps between progress lines and metric rows
  cfg.train.eval_every = 1000            # 0: evaluate only at the end
  cfg.train.eval_batches = 8             # held-out batches per evaluation
  cfg.train.checkpoint_every = 1000      # 0: only at the end and on SIGTERM or Ctrl-C
  cfg.train.keep_checkpoints = 3         # newest checkpoints kept
  cfg.train.max_nonfinite_steps = 10     # stop after this many non-finite steps in a row
  cfg.train.selection_gap_warning = 0.05 # warn when a SAL's eval-rule fraction differs more

  # --- parallelism (docs/scaling.md) --------------------------------------------------------
  cfg.mesh = ml_collections.ConfigDict()
  cfg.mesh.data = -1                     # -1: the devices the other axes leave
  cfg.mesh.fsdp = 1                      # batch rows and parameters (ZeRO-3 style)
  cfg.mesh.tensor = 1                    # heads and hidden widths
  cfg.mesh.sequence = 1                  # each row's length (context parallelism)
  cfg.mesh.dcn_data = 1                  # slices (or hosts) the data axis spans
  cfg.sharding = ml_collections.ConfigDict()
  # logical axis -> mesh axes; logical names without a rule are replicated
  cfg.sharding.rules = ("batch=data+fsdp, vocab=tensor, embed=fsdp, heads=tensor, mlp=tensor, "
                        "mamba_inner=tensor, length=sequence")

  # --- data ---------------------------------------------------------------------------------
  cfg.data = ml_collections.ConfigDict()
  cfg.data.task = "mqar"                 # "mqar", "copy" (induction heads) or "text"
  cfg.data.seq_len = 4096                # training sequence length (tokens per row)
  cfg.data.num_kv_pairs = 8              # MQAR: key-value pairs shown, then queried
  cfg.data.num_queries = 0               # MQAR: 0 queries fill the row; k: k spaced-out queries
  cfg.data.path = ""                     # text: a file, a directory or a glob
  cfg.data.text_field = "text"           # text: the field of a .jsonl record
  cfg.data.tokenizer = ""                # text: a SentencePiece .model or an HF tokenizer.json
  cfg.data.eval_fraction = 0.01          # text: share of documents held out for evaluation
  cfg.data.num_workers = 0               # grain worker processes (0: the main process)
  cfg.data.read_threads = 4              # grain threads reading and tokenizing per process
  return cfg
