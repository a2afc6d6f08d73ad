"""Train, evaluate and sample deep generative models from the command line.

python train.py                                   # the default job: VAE on scikit-learn digits, fit + test
python train.py fit --config configs/vae_digits.yaml --model.latent_dim 32
python train.py fit --model VAE --data DigitsDataModule --model.data_shape "[1,8,8]"
python train.py predict --config configs/vae_digits.yaml --ckpt_path runs/.../checkpoints/last.ckpt
python train.py fit --help                        # every option
"""

from dgm_lightning.cli import main

if __name__ == "__main__":
    main()
