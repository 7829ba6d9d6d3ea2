"""CycleGAN between the idealised render (domain A) and experimental scans (domain B).

cyclegan.py: networks, image pool, Translator (a generator with its intensity windows);
train.py: `train_gan` (the training, a job of util.resumable's engine); synthesize.py: `synthesize` (Tr-sim -> Tr-GAN)
and the structure check `structure_iou`.
"""
