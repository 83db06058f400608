"""selfnpo.models"""
