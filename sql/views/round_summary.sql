-- Per experiment and round k: its rollouts (count, mean reward, share correct, mean completion length,
-- mean |advantage|), the training on them (steps, p = mean positive_share, p_eff = mean
-- effective_positive_share) and the test accuracy of the checkpoint that training produced, μ_{k+1}
-- (evals of round k + 1). What a round has not got yet (advantages, train_steps, evals) is null; steps is 0.
with rollout_stats as (
    select experiment, round, count(*) as rollouts, avg(num_tokens) as mean_completion_tokens
    from rollouts
    group by all
),

reward_stats as (
    select experiment, round, avg(reward) as mean_reward, avg((outcome = 'correct')::int) as share_correct
    from rewards
    group by all
),

advantage_stats as (
    select experiment, round, avg(abs(advantage)) as mean_abs_advantage
    from advantages
    group by all
),

train_stats as (
    select
        experiment,
        round,
        count(*) as steps,
        avg(positive_share) as p,
        avg(effective_positive_share) as p_eff
    from train_steps
    group by all
),

checkpoint_accuracy as (
    select
        experiment,
        round,
        avg(correct::int) filter (where mode = 'greedy') as test_greedy,
        avg(correct::int) filter (where mode = 'sampled') as test_sampled
    from evals
    group by all
),

final as (
    select
        r.experiment,
        r.round,
        r.rollouts,
        w.mean_reward,
        w.share_correct,
        r.mean_completion_tokens,
        a.mean_abs_advantage,
        e.test_greedy,
        e.test_sampled,
        t.p,
        t.p_eff,
        coalesce(t.steps, 0) as steps
    from rollout_stats as r
    left join reward_stats as w using (experiment, round)
    left join advantage_stats as a using (experiment, round)
    left join train_stats as t using (experiment, round)
    left join checkpoint_accuracy as e on e.experiment = r.experiment and e.round = r.round + 1
)

select * from final order by experiment, round
