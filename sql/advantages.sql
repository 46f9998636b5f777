-- Baseline V and advantage A = r − V per rollout (AsymRE, arXiv 2506.20520: V = group mean + δV, δV < 0).
-- Parameters: $mode (group_mean | constant | batch_mean), $delta_v, $constant. Reads `rewards`.
with groups as (
    select experiment, round, prompt_id, count(*)::integer as group_size, avg(reward) as group_mean_reward
    from rewards
    group by all
),

batch as (
    select experiment, round, avg(reward) as batch_mean_reward
    from rewards
    group by all
),

baselines as (
    select
        w.experiment,
        w.round,
        w.prompt_id,
        w.sample_idx,
        w.reward,
        g.group_size,
        g.group_mean_reward,
        -- a group of one has no mean of its own: fall back to the round's mean (and say so)
        case
            when $mode = 'constant' then $constant
            when $mode = 'batch_mean' or g.group_size = 1 then b.batch_mean_reward + $delta_v
            else g.group_mean_reward + $delta_v
        end as baseline,
        case when $mode = 'constant' then 0.0 else $delta_v end as delta_v,
        case
            when $mode = 'group_mean' and g.group_size = 1 then 'batch_mean'
            else $mode
        end as baseline_mode
    from rewards as w
    join groups as g using (experiment, round, prompt_id)
    join batch as b using (experiment, round)
),

final as (
    select
        experiment,
        round,
        prompt_id,
        sample_idx,
        group_size,
        group_mean_reward,
        baseline::double as baseline,
        delta_v::double as delta_v,
        (reward - baseline)::double as advantage,
        baseline_mode::varchar as baseline_mode
    from baselines
)

select * from final order by experiment, round, prompt_id, sample_idx
