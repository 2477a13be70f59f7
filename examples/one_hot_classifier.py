"""One-hot labels straight into the loss, class weights with PyTorch's
weighted mean, and diagnose() catching a softmax before the loss.

    python examples/one_hot_classifier.py
"""

import torch
import torch.nn.functional as F

import crossent

torch.manual_seed(0)
x = torch.randn(256, 20)
y = (x[:, :3].argmax(1))  # three classes
one_hot = F.one_hot(y, 3)  # int64 one-hot rows: torch.nn.CrossEntropyLoss rejects these

model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
loss_fn = crossent.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.05)
opt = torch.optim.SGD(model.parameters(), lr=0.5)
for step in range(200):
    opt.zero_grad()
    loss = loss_fn(model(x), one_hot)
    loss.backward()
    opt.step()
accuracy = (model(x).argmax(1) == y).float().mean()
print(f"loss {loss.item():.4f}, train accuracy {accuracy:.1%}")

for finding in crossent.diagnose(model(x).softmax(1), y):
    print("diagnose:", finding)
