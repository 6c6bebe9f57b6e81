"""Recovery, torchtune's recipe shape (setup → loss_step → train → save) under accelerate.

``config`` the grouped settings (torch-free) · ``trainer`` the loop · ``losses`` the loss registry ·
``model`` LoRA / QLoRA model, adapter gathering and merge · ``checkpoints`` save / resume ·
``data`` examples, order and batches · ``plain_loop`` the plain-peft speed baseline.
"""
