"""Framework-free evaluation maths (numpy only): ROC/AUC, FID, image quality."""
