"""selfnpo.evaluation"""
