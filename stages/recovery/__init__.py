"""Recovery, torchtune's recipe shape (setup → loss_step → train → save) under accelerate.

``config`` the grouped settings (torch-free) · ``trainer`` the loop · ``losses`` the loss registry (ce, kd,
ce+kd), the frozen teacher and the block mapping · ``teacher_cache`` the teacher's top-k logits on disk ·
``model`` LoRA / QLoRA / full model, adapter gathering and merge · ``checkpoints`` save / resume ·
``data`` examples, order and batches · ``plain_loop`` the plain-peft speed baseline.
"""
