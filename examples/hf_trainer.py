"""Fine-tune a tiny Llama-style model with Hugging Face's Trainer, with and without crossent.

    python examples/hf_trainer.py

The model is built from a LlamaConfig (random init, nothing downloaded): 2
layers, hidden size 64, and a 32000-token vocabulary as in Llama 2, of which
the byte-level tokenisation uses the first 256 ids. The text is Python's own
standard library source (textwrap.py), so the script runs offline. Trainer runs
4 optimizer steps on the CPU, one thread (batch 4 x 256 tokens, gradient
accumulation 2, so ``num_items_in_batch`` matters; the first 16 bytes of each
row are a prompt labelled -100) twice from the same initial weights:

- stock: the model computes its logits [4, 256, 32000] and Hugging Face's
  ForCausalLMLoss (a float32 copy, log-softmax, their gradients);
- crossent: ``crossent.integrations.transformers.apply(model)``, the loss is
  ``crossent.linear_cross_entropy`` on the last hidden states and the lm_head
  weight: the logits are never built.

Each run is in its own process; its peak memory is the peak resident set size
(``resource.getrusage(...).ru_maxrss``) minus the resident size just before
``trainer.train()``: the memory training added, weights and optimizer state
included. The losses of the two runs should agree to float32 rounding.
"""

import json
import os
import resource
import subprocess
import sys
import textwrap
import time

VOCAB, SEQ, BATCH, STEPS, ACCUM = 32000, 256, 4, 4, 2


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _dataset(torch):
    with open(textwrap.__file__, "rb") as f:
        data = torch.tensor(list(f.read()), dtype=torch.long)  # bytes are token ids 0..255
    n = BATCH * ACCUM * STEPS
    stride = max(1, (len(data) - SEQ) // n)
    rows = [data[i * stride:i * stride + SEQ] for i in range(n)]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            # a prompt of 16 bytes not trained on, as in instruction tuning: labels -100 there
            labels = rows[i].clone()
            labels[:16] = -100
            return {"input_ids": rows[i], "labels": labels}

    return Rows()


def run(which):
    """Train once; ``which`` is "stock" or "crossent". Returns the logged losses and memory figures."""
    import torch
    import transformers
    from transformers.trainer_callback import PrinterCallback

    transformers.logging.set_verbosity_error()
    # one thread: the tiny decoder's matmuls are too small to split, and on a busy machine two threads wait on
    # each other far longer than they compute
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=SEQ, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    if which == "crossent":
        from crossent.integrations import transformers as crossent_hf
        crossent_hf.apply(model)
    args = transformers.TrainingArguments(
        output_dir="/tmp/crossent_hf_trainer", per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=3e-3, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(torch))
    trainer.remove_callback(PrinterCallback)
    before = _rss_bytes()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "peak_mib": (_peak_rss_bytes() - before) / 2**20, "seconds": seconds}


def main():
    results = {}
    for which in ("stock", "crossent"):
        out = subprocess.run([sys.executable, __file__, "--run", which], capture_output=True, text=True,
                             check=False)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"the {which} run failed")
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    s, c = results["stock"], results["crossent"]
    print(f"tiny Llama (hidden 64, 2 layers, vocab {VOCAB}), Trainer on CPU: {STEPS} steps of "
          f"{BATCH}x{SEQ} tokens, gradient accumulation {ACCUM}")
    print(f"{'step':>4}  {'stock loss':>10}  {'crossent loss':>13}  {'difference':>10}")
    for i, (a, b) in enumerate(zip(s["losses"], c["losses"]), 1):
        print(f"{i:>4}  {a:>10.6f}  {b:>13.6f}  {abs(a - b):>10.2e}")
    print("peak memory added by training (resource ru_maxrss minus the RSS before train(), each run in its own "
          "process), and train() wall time (one thread, not a benchmark):")
    print(f"  stock    {s['peak_mib']:7.1f} MiB   {s['seconds']:5.1f} s")
    print(f"  crossent {c['peak_mib']:7.1f} MiB   {c['seconds']:5.1f} s")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run":
        print(json.dumps(run(sys.argv[2])))
    else:
        main()
