"""selfnpo.world"""
