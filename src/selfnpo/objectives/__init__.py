"""selfnpo.objectives"""
