using System.Globalization;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Protocol;

/// <summary>
/// Fault kinds by their short names (<c>iommu-fault</c>, <c>device-error</c>, …) and a fault's
/// settings in words, as dmactl shows them and the broker's audit log records them.
/// </summary>
public static class FaultNames
{
    private static readonly (FaultKind Kind, string Name)[] Names =
    [
        (FaultKind.IommuFault, "iommu-fault"),
        (FaultKind.DeviceError, "device-error"),
        (FaultKind.DropInterrupt, "drop-interrupt"),
        (FaultKind.DelayInterrupt, "delay-interrupt"),
        (FaultKind.SlowReset, "slow-reset"),
        (FaultKind.SurpriseRemove, "surprise-remove"),
        (FaultKind.LinkDown, "link-down"),
    ];

    /// <summary>Every kind's short name, in the enum's order.</summary>
    public static IReadOnlyList<string> All { get; } = [.. Names.Select(n => n.Name)];

    /// <summary>The short name of <paramref name="kind"/>; the number for a kind this version does not know.</summary>
    public static string Of(FaultKind kind) =>
        Names.FirstOrDefault(n => n.Kind == kind).Name ?? ((int)kind).ToString(CultureInfo.InvariantCulture);

    /// <summary>The kind a short name names, or null.</summary>
    public static FaultKind? Parse(string name) =>
        Names.FirstOrDefault(n => string.Equals(n.Name, name, StringComparison.OrdinalIgnoreCase)) is { Name: not null } found ? found.Kind : null;

    /// <summary>An injection request in words: its kind and every setting it gives.</summary>
    public static string Describe(InjectFaultRequest r) =>
        Settings(r.Count, r.DelayMs, r.Status, r.ProbabilityPercent, r.Seed, r.HasOpcode ? r.Opcode : null, r.LbaStart, r.LbaCount) is { Length: > 0 } settings
            ? $"{Of(r.Kind)} ({settings})"
            : Of(r.Kind);

    /// <summary>An injected fault's settings in words (not its kind): <c>count 3, probability 50% (seed 7), status 0x4</c>; empty when it gives none.</summary>
    public static string Settings(InjectedFault f) =>
        Settings(f.Count, f.DelayMs, f.Status, f.ProbabilityPercent, f.Seed, f.HasOpcode ? f.Opcode : null, f.LbaStart, f.LbaCount);

    private static string Settings(uint count, uint delayMs, uint status, uint probability, ulong seed, uint? opcode, ulong lbaStart, ulong lbaCount)
    {
        var parts = new List<string>();
        if (count != 0)
            parts.Add(string.Create(CultureInfo.InvariantCulture, $"count {count}"));
        if (delayMs != 0)
            parts.Add(string.Create(CultureInfo.InvariantCulture, $"delay {delayMs} ms"));
        if (probability is not (0 or 100))
            parts.Add(string.Create(CultureInfo.InvariantCulture, $"probability {probability}% (seed {seed})"));
        if (status != 0)
            parts.Add(string.Create(CultureInfo.InvariantCulture, $"status 0x{status:x}"));
        if (opcode is { } op)
            parts.Add(string.Create(CultureInfo.InvariantCulture, $"opcode 0x{op:x2}"));
        if (lbaCount != 0)
            parts.Add(string.Create(CultureInfo.InvariantCulture, $"lba [{lbaStart}, +{lbaCount})"));
        return string.Join(", ", parts);
    }
}
