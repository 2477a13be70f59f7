"""Distil a teacher's top-k into a small language-model head without the
[N, V] logits of either model: linear_cross_entropy with a SparseTarget.

    python examples/distill_topk.py
"""

import torch

import crossent

torch.manual_seed(0)
B, T, H, V, k = 4, 32, 64, 5000, 8
hidden = torch.randn(B, T, H, requires_grad=True)  # the student's last hidden states
head = torch.nn.Linear(H, V, bias=False)  # the student's output layer

# The teacher's top-k per position (as a server would send them), renormalised over the k entries.
teacher_logits = torch.randn(B, T, V) * 3
top = teacher_logits.topk(k, dim=-1)
target = crossent.SparseTarget(top.indices, torch.softmax(top.values, dim=-1))

loss = crossent.linear_cross_entropy(hidden, head.weight, target, z_loss=1e-4)
loss.backward()
print(f"distillation loss {loss.item():.4f}; grad norms: hidden {hidden.grad.norm():.3f}, "
      f"head {head.weight.grad.norm():.3f}")

# Causal LM training step on labels: position t predicts label t+1, padding is -100.
labels = torch.randint(0, V, (B, T))
labels[:, -5:] = -100
loss = crossent.linear_cross_entropy(hidden, head.weight, labels, shift=True, label_smoothing=0.1)
print(f"next-token loss {loss.item():.4f}")
