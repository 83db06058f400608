"""selfnpo.training"""
